"""Captions for synthetic scenes at four granularities, ordered from lowest to highest quality:

    synthetic:short       one short sentence in a GenEval task's phrasing ("a picture of two red circles")
    synthetic:two         two sentences: the short one plus the background
    synthetic:detailed    3-5 sentences: count, each object (colour, size, place), a relation
    synthetic:paragraph   every object, every pairwise relation, background, texture and framing

Training captions never open with "a photo of": that is GenEval's prompt phrasing, kept for the held-out
prompts (`heldout_metadata`), so no held-out prompt is a training caption. Short captions of tasks whose
GenEval prompts name no colour (single_object, two_object, counting, position) name one only half the time.
"""

from __future__ import annotations

import numpy as np

from nucleus_image.data.scene import Scene, SceneObject

CAPTION_SOURCES = ("synthetic:short", "synthetic:two", "synthetic:detailed", "synthetic:paragraph")
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}
# Many openers, so a model learns that the words before the objects carry no content: with few of them, an
# unseen opener (the held-out prompts' "a photo of") pulls attention away from the objects and blanks images.
OPENERS = (
    "",
    "a picture of ",
    "an image of ",
    "a drawing of ",
    "a rendering of ",
    "a simple picture of ",
    "an illustration of ",
    "a graphic of ",
    "a sketch of ",
    "a diagram of ",
    "a render of ",
    "a snapshot of ",
    "a view of ",
    "a scene with ",
    "a still of ",
    "a painting of ",
    "clip art of ",
    "a flat image of ",
    "a digital picture of ",
    "a close view of ",
)
TEXTURE_WORDS = {
    "plain": "plain",
    "grain": "grainy",
    "stripes": "faintly striped",
    "gradient": "softly shaded",
    "checker": "faintly checkered",
}
RELATION_PHRASES = {
    "left of": ("left of", "to the left of", "on the left of"),
    "right of": ("right of", "to the right of", "on the right of"),
    "above": ("above", "over", "on top of"),
    "below": ("below", "under", "beneath"),
}
FRAMING = {
    "1:1": "square",
    "4:3": "landscape",
    "3:2": "landscape",
    "16:9": "wide",
    "3:4": "portrait",
    "2:3": "portrait",
    "9:16": "tall",
}


def plural(shape: str) -> str:
    return shape + ("es" if shape.endswith(("s", "x", "ch", "sh")) else "s")


def with_article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def noun_phrase(shape: str, count: int = 1, color: str | None = None, size: str | None = None) -> str:
    """'a red circle', 'an orange star', 'three crosses', 'a large blue square'."""
    words = " ".join(w for w in (size, color, shape if count == 1 else plural(shape)) if w)
    return with_article(words) if count == 1 else f"{NUMBER_WORDS[count]} {words}"


def geneval_prompt(record: dict) -> str:
    """GenEval's prompt phrasing for a metadata record ("a photo of a dog right of a teddy bear")."""
    inc = record["include"]
    objs = [noun_phrase(e["class"], int(e["count"]), e.get("color")) for e in inc]
    if record["tag"] == "position":
        return f"a photo of {objs[1]} {inc[1]['position'][0]} {objs[0]}"
    return "a photo of " + " and ".join(objs)


def region(obj: SceneObject, width: int, height: int) -> str:
    """Where an object sits, as a prepositional phrase on a 3x3 grid ("in the upper left", "at the top")."""
    col = ("left", "", "right")[min(2, int(3 * obj.cx / width))]
    row = ("upper", "", "lower")[min(2, int(3 * obj.cy / height))]
    if row and col:
        return f"in the {row} {col}"
    if row:
        return "at the top" if row == "upper" else "at the bottom"
    return f"on the {col}" if col else "in the center"


def _pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:] + "."


def _relation_text(rng, rels: set[str], subject: str, reference: str) -> str | None:
    if not rels:
        return None
    order = [r for r in ("above", "below", "left of", "right of") if r in rels]
    phrase = " and ".join(_pick(rng, RELATION_PHRASES[r]) for r in order)
    return f"the {subject} is {phrase} the {reference}"


def short_caption(scene: Scene, rng: np.random.Generator) -> str:
    objs, task = scene.objects, scene.task
    colored = task in ("colors", "color_attr") or rng.random() < 0.5
    color = (lambda o: o.color) if colored else (lambda o: None)
    if task == "counting":
        same = len({o.color for o in objs}) == 1
        body = noun_phrase(objs[0].shape, len(objs), color(objs[0]) if same else None)
    elif task == "position":
        rel, subj, ref = scene.relation
        body = (
            f"{noun_phrase(objs[subj].shape, 1, color(objs[subj]))} {_pick(rng, RELATION_PHRASES[rel])} "
            f"{noun_phrase(objs[ref].shape, 1, color(objs[ref]))}"
        )
    else:
        body = " and ".join(noun_phrase(o.shape, 1, color(o)) for o in objs)
    return _pick(rng, OPENERS) + body


def _background_text(scene: Scene) -> str:
    return f"{TEXTURE_WORDS[scene.texture]} {scene.background} background"


def _object_sentence(obj: SceneObject, scene: Scene, rng) -> str:
    verb = _pick(rng, ("is", "sits", "appears"))
    return _sentence(
        f"{noun_phrase(obj.shape, 1, obj.color, obj.size_class)} {verb} {region(obj, scene.width, scene.height)}"
    )


def captions_for(scene: Scene, rng: np.random.Generator, relations: dict[tuple[int, int], set[str]]) -> list[str]:
    """The four captions (low to high quality) of a scene; `relations[(i, j)]` holds the GenEval relations of
    object i to object j, so every relation a caption states is one the scorer would confirm."""
    objs = scene.objects
    short = short_caption(scene, rng)
    count_text = noun_phrase("shape", len(objs)) if len(objs) > 1 else "a single shape"
    two = f"{_sentence(short)} {_sentence(f'the background is {TEXTURE_WORDS[scene.texture]} {scene.background}')}"

    # The scene's defining relation first, then every other pair of differently shaped objects ("the circle
    # is left of the circle" would name nothing).
    pairs = [scene.relation[1:]] if scene.relation else []
    pairs += [(i, j) for i in range(len(objs)) for j in range(i + 1, len(objs)) if {(i, j), (j, i)}.isdisjoint(pairs)]
    rel_sentences = []
    for i, j in pairs:
        text = _relation_text(rng, relations[(i, j)], objs[i].shape, objs[j].shape)
        if text and objs[i].shape != objs[j].shape:
            rel_sentences.append(_sentence(text))

    intro = _sentence(f"{_pick(rng, OPENERS[1:]).strip()} {count_text} on a {_background_text(scene)}")
    object_sents = [_object_sentence(o, scene, rng) for o in objs]
    detailed = [intro] + object_sents[:3] + rel_sentences[:1]
    if len(detailed) < 3:
        detailed.append(_sentence(f"the picture is {FRAMING[scene.aspect]}, {scene.aspect}"))
    detailed = " ".join(detailed[:5])

    paragraph = [intro]
    if scene.task == "counting":
        same = len({o.color for o in objs}) == 1
        paragraph.append(
            _sentence(f"there are exactly {noun_phrase(objs[0].shape, len(objs), objs[0].color if same else None)}")
        )
    paragraph += object_sents + rel_sentences
    short_side = min(scene.width, scene.height)
    for o in objs if len({(o.color, o.shape) for o in objs}) == len(objs) else ():  # only when unambiguous
        paragraph.append(
            _sentence(
                f"the {o.color} {o.shape} spans about {round(100 * o.size / short_side)} percent "
                f"of the picture's shorter side"
            )
        )
    paragraph.append(_sentence(f"behind the shapes lies a {_background_text(scene)}"))
    paragraph.append(
        _sentence(f"the shapes are flat and solid, with crisp edges, in a {FRAMING[scene.aspect]} {scene.aspect} frame")
    )
    return [short, two, detailed, " ".join(paragraph)]
