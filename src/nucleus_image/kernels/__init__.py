"""Fused Triton kernels for the model's hot paths, each beside its pure-PyTorch reference.

Every kernel is registered as a torch custom op (`torch.library.triton_op`) with its backward, so autograd,
`torch.compile` and FSDP2 see one op rather than an opaque call. The model uses them behind one switch
(`TransformerConfig.kernels`, `--kernels` on the CLI); the reference path stays the default on CPU.

On a machine without a GPU the kernels run under Triton's interpreter (`TRITON_INTERPRET=1`), which is how the
tests check them against their references; see `runtime.py`.
"""
