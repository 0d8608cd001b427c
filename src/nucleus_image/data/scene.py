"""A synthetic scene: its task, canvas and objects, with the GenEval record and annotations it stands for. The
generator (synthetic.py) draws scenes and captions.py describes them; both read what a scene is from here."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size_class: str
    size: float  # side of the object's square box in pixels
    cx: float
    cy: float

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        h = self.size / 2
        return (self.cx - h, self.cy - h, self.cx + h, self.cy + h)


@dataclass(frozen=True)
class Scene:
    task: str
    width: int
    height: int
    aspect: str
    background: str
    texture: str
    objects: tuple[SceneObject, ...]
    relation: tuple[str, int, int] | None = None  # (relation, subject index, reference index)

    @property
    def bucket(self) -> int:
        if self.task == "counting":
            return {2: 4, 3: 6, 4: 8}[len(self.objects)]
        return {"single_object": 1, "colors": 2, "two_object": 3, "color_attr": 5, "position": 7}[self.task]

    @property
    def tier(self) -> int:
        return (self.bucket + 1) // 2 + (self.texture != "plain")

    def metadata(self) -> dict:
        """This scene's GenEval-style record (without a prompt): what a correct image of it must show."""
        objs = self.objects
        if self.task in ("single_object", "colors"):
            inc = [{"class": objs[0].shape, "count": 1}]
        elif self.task == "counting":
            inc = [{"class": objs[0].shape, "count": len(objs)}]
        else:
            inc = [{"class": o.shape, "count": 1} for o in objs]
        if self.task == "colors" or self.task == "color_attr":
            for entry, o in zip(inc, objs):
                entry["color"] = o.color
        if self.task == "position":
            rel, subj, ref = self.relation
            inc = [
                {"class": objs[ref].shape, "count": 1},
                {"class": objs[subj].shape, "count": 1, "position": [rel, 0]},
            ]
        record = {"tag": self.task, "include": inc}
        if self.task == "counting":
            record["exclude"] = [{"class": objs[0].shape, "count": len(objs) + 1}]
        return record

    def annotations(self) -> dict:
        return {
            "task": self.task,
            "background": self.background,
            "texture": self.texture,
            "aspect": self.aspect,
            "objects": [
                {
                    "shape": o.shape,
                    "color": o.color,
                    "size": o.size_class,
                    "bbox": [round(v, 2) for v in o.bbox],
                    "center": [round(o.cx, 2), round(o.cy, 2)],
                }
                for o in self.objects
            ],
            "relation": list(self.relation) if self.relation else None,
            "geneval": self.metadata(),
        }
