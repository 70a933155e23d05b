"""Class names and colour palettes of the benchmark datasets.

The names and colours are the ones commonly used with these benchmarks (as in
mmsegmentation), so that label maps and overlays look the same as elsewhere.
``DATASET_INFO`` maps a dataset name to a :class:`DatasetInfo`; :func:`make_palette` and
:func:`class_names` give a deterministic palette and names for any number of classes.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DatasetInfo", "DATASET_INFO", "get_dataset_info", "make_palette", "class_names", "class_info", "list_datasets"]

Color = tuple[int, int, int]


@dataclass(frozen=True)
class DatasetInfo:
    """Class names and their RGB colours, index = class id."""

    classes: tuple[str, ...]
    palette: tuple[Color, ...]

    def __post_init__(self) -> None:
        if len(self.classes) != len(self.palette):
            raise ValueError(f"{len(self.classes)} class names but {len(self.palette)} colours")

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _colors(flat: str) -> tuple[Color, ...]:
    """Parse ``"r g b, r g b, ..."`` into RGB triples."""
    out = []
    for item in flat.replace("\n", " ").split(","):
        if item.strip():
            r, g, b = (int(v) for v in item.split())
            out.append((r, g, b))
    return tuple(out)


def _names(text: str) -> tuple[str, ...]:
    """Parse ``"name|name|..."`` (whitespace around names ignored)."""
    return tuple(n.strip() for n in text.replace("\n", " ").split("|") if n.strip())


# -- ADE20K (SceneParsing, 150 classes) --------------------------------------------------
_ADE20K_CLASSES = _names("""
wall|building|sky|floor|tree|ceiling|road|bed|windowpane|grass|cabinet|sidewalk|person|earth|door|
table|mountain|plant|curtain|chair|car|water|painting|sofa|shelf|house|sea|mirror|rug|field|
armchair|seat|fence|desk|rock|wardrobe|lamp|bathtub|railing|cushion|base|box|column|signboard|
chest of drawers|counter|sand|sink|skyscraper|fireplace|refrigerator|grandstand|path|stairs|runway|
case|pool table|pillow|screen door|stairway|river|bridge|bookcase|blind|coffee table|toilet|flower|
book|hill|bench|countertop|stove|palm|kitchen island|computer|swivel chair|boat|bar|arcade machine|
hovel|bus|towel|light|truck|tower|chandelier|awning|streetlight|booth|television receiver|airplane|
dirt track|apparel|pole|land|bannister|escalator|ottoman|bottle|buffet|poster|stage|van|ship|
fountain|conveyer belt|canopy|washer|plaything|swimming pool|stool|barrel|basket|waterfall|tent|bag|
minibike|cradle|oven|ball|food|step|tank|trade name|microwave|pot|animal|bicycle|lake|dishwasher|
screen|blanket|sculpture|hood|sconce|vase|traffic light|tray|ashcan|fan|pier|crt screen|plate|
monitor|bulletin board|shower|radiator|glass|clock|flag
""")

_ADE20K_PALETTE = _colors("""
120 120 120, 180 120 120, 6 230 230, 80 50 50, 4 200 3, 120 120 80, 140 140 140, 204 5 255,
230 230 230, 4 250 7, 224 5 255, 235 255 7, 150 5 61, 120 120 70, 8 255 51, 255 6 82,
143 255 140, 204 255 4, 255 51 7, 204 70 3, 0 102 200, 61 230 250, 255 6 51, 11 102 255,
255 7 71, 255 9 224, 9 7 230, 220 220 220, 255 9 92, 112 9 255, 8 255 214, 7 255 224,
255 184 6, 10 255 71, 255 41 10, 7 255 255, 224 255 8, 102 8 255, 255 61 6, 255 194 7,
255 122 8, 0 255 20, 255 8 41, 255 5 153, 6 51 255, 235 12 255, 160 150 20, 0 163 255,
140 140 140, 250 10 15, 20 255 0, 31 255 0, 255 31 0, 255 224 0, 153 255 0, 0 0 255,
255 71 0, 0 235 255, 0 173 255, 31 0 255, 11 200 200, 255 82 0, 0 255 245, 0 61 255,
0 255 112, 0 255 133, 255 0 0, 255 163 0, 255 102 0, 194 255 0, 0 143 255, 51 255 0,
0 82 255, 0 255 41, 0 255 173, 10 0 255, 173 255 0, 0 255 153, 255 92 0, 255 0 255,
255 0 245, 255 0 102, 255 173 0, 255 0 20, 255 184 184, 0 31 255, 0 255 61, 0 71 255,
255 0 204, 0 255 194, 0 255 82, 0 10 255, 0 112 255, 51 0 255, 0 194 255, 0 122 255,
0 255 163, 255 153 0, 0 255 10, 255 112 0, 143 255 0, 82 0 255, 163 255 0, 255 235 0,
8 184 170, 133 0 255, 0 255 92, 184 0 255, 255 0 31, 0 184 255, 0 214 255, 255 0 112,
92 255 0, 0 224 255, 112 224 255, 70 184 160, 163 0 255, 153 0 255, 71 255 0, 255 0 163,
255 204 0, 255 0 143, 0 255 235, 133 255 0, 255 0 235, 245 0 255, 255 0 122, 255 245 0,
10 190 212, 214 255 0, 0 204 255, 20 0 255, 255 255 0, 0 153 255, 0 41 255, 0 255 204,
41 0 255, 41 255 0, 173 0 255, 0 245 255, 71 0 255, 122 0 255, 0 255 184, 0 92 255,
184 255 0, 0 133 255, 255 214 0, 25 194 194, 102 255 0, 92 0 255
""")

# -- Cityscapes (19 train ids) -------------------------------------------------------------
_CITYSCAPES_CLASSES = _names("""
road|sidewalk|building|wall|fence|pole|traffic light|traffic sign|vegetation|terrain|sky|person|
rider|car|truck|bus|train|motorcycle|bicycle
""")

_CITYSCAPES_PALETTE = _colors("""
128 64 128, 244 35 232, 70 70 70, 102 102 156, 190 153 153, 153 153 153, 250 170 30,
220 220 0, 107 142 35, 152 251 152, 70 130 180, 220 20 60, 255 0 0, 0 0 142, 0 0 70,
0 60 100, 0 80 100, 0 0 230, 119 11 32
""")

# -- COCO-Stuff-164k (171 classes: 80 things + 91 stuff) -----------------------------------
_COCOSTUFF_CLASSES = _names("""
person|bicycle|car|motorcycle|airplane|bus|train|truck|boat|traffic light|fire hydrant|stop sign|
parking meter|bench|bird|cat|dog|horse|sheep|cow|elephant|bear|zebra|giraffe|backpack|umbrella|
handbag|tie|suitcase|frisbee|skis|snowboard|sports ball|kite|baseball bat|baseball glove|skateboard|
surfboard|tennis racket|bottle|wine glass|cup|fork|knife|spoon|bowl|banana|apple|sandwich|orange|
broccoli|carrot|hot dog|pizza|donut|cake|chair|couch|potted plant|bed|dining table|toilet|tv|
laptop|mouse|remote|keyboard|cell phone|microwave|oven|toaster|sink|refrigerator|book|clock|vase|
scissors|teddy bear|hair drier|toothbrush|banner|blanket|branch|bridge|building-other|bush|cabinet|
cage|cardboard|carpet|ceiling-other|ceiling-tile|cloth|clothes|clouds|counter|cupboard|curtain|
desk-stuff|dirt|door-stuff|fence|floor-marble|floor-other|floor-stone|floor-tile|floor-wood|
flower|fog|food-other|fruit|furniture-other|grass|gravel|ground-other|hill|house|leaves|light|mat|
metal|mirror-stuff|moss|mountain|mud|napkin|net|paper|pavement|pillow|plant-other|plastic|platform|
playingfield|railing|railroad|river|road|rock|roof|rug|salad|sand|sea|shelf|sky-other|skyscraper|
snow|solid-other|stairs|stone|straw|structural-other|table|tent|textile-other|towel|tree|vegetable|
wall-brick|wall-concrete|wall-other|wall-panel|wall-stone|wall-tile|wall-wood|water-other|
waterdrops|window-blind|window-other|wood
""")

_COCOSTUFF_PALETTE = _colors("""
0 192 64, 0 192 64, 0 64 96, 128 192 192, 0 64 64, 0 192 224, 0 192 192, 128 192 64,
0 192 96, 128 192 64, 128 32 192, 0 0 224, 0 0 64, 0 160 192, 128 0 96, 128 0 192,
0 32 192, 128 128 224, 0 0 192, 128 160 192, 128 128 0, 128 0 32, 128 32 0, 128 0 128,
64 128 32, 0 160 0, 0 0 0, 192 128 160, 0 32 0, 0 128 128, 64 128 160, 128 160 0,
0 128 0, 192 128 32, 128 96 128, 0 0 128, 64 0 32, 0 224 128, 128 0 0, 192 0 160,
0 96 128, 128 128 128, 64 0 160, 128 224 128, 128 128 64, 192 0 32, 128 96 0, 128 0 192,
0 128 32, 64 224 0, 0 0 64, 128 128 160, 64 96 0, 0 128 192, 0 128 160, 192 224 0,
0 128 64, 128 128 32, 192 32 128, 0 64 192, 0 0 32, 64 160 128, 128 64 64, 128 0 160,
64 32 128, 128 192 192, 0 0 160, 192 160 128, 128 192 0, 128 0 96, 192 32 0, 128 64 128,
64 128 96, 64 160 0, 0 64 0, 192 128 224, 64 32 0, 0 192 128, 64 128 224, 192 160 0,
0 192 0, 192 128 96, 192 96 128, 0 64 128, 64 0 96, 64 224 128, 128 64 0, 192 0 224,
64 96 128, 128 192 128, 64 0 224, 192 224 128, 128 192 64, 192 0 96, 192 96 0, 128 64 192,
0 128 96, 0 224 0, 64 64 64, 128 128 224, 0 96 0, 64 192 192, 0 128 224, 128 224 0,
64 192 64, 128 128 96, 128 32 128, 64 0 192, 0 64 96, 0 160 128, 192 0 64, 128 64 224,
0 32 128, 192 128 192, 0 64 224, 128 160 128, 192 128 0, 128 64 32, 128 32 64, 192 0 128,
64 192 32, 0 160 64, 64 0 0, 192 192 160, 0 32 64, 64 128 128, 64 192 160, 128 160 64,
64 128 0, 192 192 32, 128 96 192, 64 0 128, 64 64 32, 0 224 192, 192 0 0, 192 64 160,
0 96 192, 192 128 128, 64 64 160, 128 224 192, 192 128 64, 192 64 32, 128 96 64, 192 0 192,
0 192 32, 64 224 64, 64 0 64, 128 192 160, 64 96 64, 64 128 192, 0 192 160, 192 224 64,
64 128 64, 128 192 32, 192 32 192, 64 64 192, 0 64 32, 64 160 192, 192 64 64, 128 64 160,
64 32 192, 192 192 192, 0 64 160, 192 160 192, 192 192 0, 128 64 96, 192 32 64, 192 64 128,
64 192 96, 64 160 64, 64 64 0
""")

# -- CamVid (11 classes, SegNet grouping; 11 = void) ----------------------------------------
_CAMVID_CLASSES = _names("""
Sky|Building|Pole|Road|Pavement|Tree|SignSymbol|Fence|Car|Pedestrian|Bicyclist
""")

_CAMVID_PALETTE = _colors("""
128 128 128, 128 0 0, 192 192 128, 128 64 128, 60 40 222, 128 128 0, 192 128 128,
64 64 128, 64 0 128, 64 64 0, 0 128 192
""")

DATASET_INFO: dict[str, DatasetInfo] = {
    "ade20k": DatasetInfo(_ADE20K_CLASSES, _ADE20K_PALETTE),
    "cityscapes": DatasetInfo(_CITYSCAPES_CLASSES, _CITYSCAPES_PALETTE),
    "cocostuff": DatasetInfo(_COCOSTUFF_CLASSES, _COCOSTUFF_PALETTE),
    "camvid": DatasetInfo(_CAMVID_CLASSES, _CAMVID_PALETTE),
}

_ALIASES = {"ade": "ade20k", "ade20k-150": "ade20k", "city": "cityscapes", "coco-stuff": "cocostuff",
            "cocostuff164k": "cocostuff", "coco-stuff-164k": "cocostuff", "coco_stuff": "cocostuff",
            "coco_stuff164k": "cocostuff"}


def list_datasets() -> list[str]:
    """Names accepted by :func:`get_dataset_info`."""
    return sorted(DATASET_INFO)


def get_dataset_info(name: str) -> DatasetInfo:
    """Class names and palette of a dataset (``ade20k``, ``cityscapes``, ``cocostuff``, ``camvid``)."""
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    try:
        return DATASET_INFO[key]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(list_datasets())}") from None


def make_palette(num_classes: int) -> tuple[Color, ...]:
    """A deterministic palette of ``num_classes`` colours.

    Class ``i`` gets the PASCAL VOC colour of ``i + 1`` (the bits of ``i + 1`` spread over the three
    channels, most significant channel bit first): black is skipped so that no class looks like
    padding, colours are distinct for up to 2**24 - 1 classes and the first ones are far apart.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"num_classes must be a non-negative integer, got {num_classes!r}")
    palette = []
    for i in range(num_classes):
        rgb = [0, 0, 0]
        bit, value = 7, i + 1
        while value and bit >= 0:
            for c in range(3):
                rgb[c] |= ((value >> c) & 1) << bit
            value >>= 3
            bit -= 1
        palette.append((rgb[0], rgb[1], rgb[2]))
    return tuple(palette)


def class_info(num_classes: int, dataset: str | None = None, classes=None, palette=None) -> DatasetInfo:
    """Names and colours for ``num_classes`` classes: the given ``classes`` / ``palette`` when they
    have that length, else the named ``dataset``'s when it has that many classes, else generated."""
    info = None
    if dataset is not None:
        try:
            info = get_dataset_info(dataset)
        except ValueError:
            info = None
    if info is not None and info.num_classes != num_classes:
        info = None
    if classes is None or len(classes) != num_classes:
        classes = info.classes if info else class_names(num_classes)
    if palette is None or len(palette) != num_classes:
        palette = info.palette if info else make_palette(num_classes)
    return DatasetInfo(tuple(str(c) for c in classes), tuple(tuple(int(v) for v in c) for c in palette))


def class_names(num_classes: int) -> tuple[str, ...]:
    """Generated names ``class_0 ... class_{K-1}`` for classes without declared names."""
    return tuple(f"class_{i}" for i in range(num_classes))
