"""Deterministic synthetic scenes written in the real ADE20K and COCO formats.

Scenes: a cluttered, textured background (noise, random lines and blotches in muted colours) with a few objects of
four learnable classes, each with its own shape, hue band and texture:

  disc      round,            reddish,  smooth
  square    rotated square,   greenish, horizontal stripes
  triangle  triangle,         bluish,   checkered
  cross     plus-shaped,      yellowish, speckled

ADE20K layout: ``<root>/images/{training,validation}/ADE_*.jpg`` and ``<root>/annotations/.../ADE_*.png`` with ADE's
label convention (0 = unlabelled, ignored via ``reduce_zero_label``; 1 = background clutter; 2.. = the objects).
COCO layout: ``<root>/{train2017,val2017}/*.jpg`` and ``<root>/annotations/instances_{train,val}2017.json`` with boxes
(xywh) and polygon segmentations. Objects do not overlap, so polygons are exact masks.
A ``.done`` marker holding the generator version and arguments makes re-generation a no-op.
"""
import json
import math
import os
from typing import Dict, List, Tuple

import numpy as np
from PIL import Image, ImageDraw

GENERATOR_VERSION = 1
DEMO_CLASSES = ('disc', 'square', 'triangle', 'cross')
SEG_CLASSES = ('background',) + DEMO_CLASSES
_HUES = {'disc': (200, 40, 40), 'square': (40, 170, 60), 'triangle': (50, 70, 210), 'cross': (220, 200, 40)}


def _polygon(cls: str, cx: float, cy: float, r: float, angle: float) -> List[Tuple[float, float]]:
    if cls == 'disc':
        pts = [(math.cos(t), math.sin(t)) for t in np.linspace(0, 2 * math.pi, 24, endpoint=False)]
    elif cls == 'square':
        pts = [(math.cos(t), math.sin(t)) for t in np.array([0.25, 0.75, 1.25, 1.75]) * math.pi]
    elif cls == 'triangle':
        pts = [(math.cos(t), math.sin(t)) for t in np.array([-0.5, 1 / 6, 5 / 6]) * math.pi]
    else:  # cross: plus sign with arm half-width 0.35
        a = 0.35
        pts = [(a, 1), (a, a), (1, a), (1, -a), (a, -a), (a, -1), (-a, -1), (-a, -a), (-1, -a), (-1, a), (-a, a),
               (-a, 1)]
    ca, sa = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * ca - y * sa), cy + r * (x * sa + y * ca)) for x, y in pts]


def _texture(cls: str, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    base = np.array(_HUES[cls], np.float32) + rng.uniform(-25, 25, 3)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.broadcast_to(base, (h, w, 3)).copy()
    if cls == 'square':
        img *= (0.75 + 0.25 * ((yy // 3) % 2))[..., None]
    elif cls == 'triangle':
        img *= (0.75 + 0.25 * (((yy // 4) + (xx // 4)) % 2))[..., None]
    elif cls == 'cross':
        img *= rng.uniform(0.6, 1.0, (h, w, 1))
    return img


def _background(h: int, w: int, rng: np.random.Generator) -> Image.Image:
    base = rng.uniform(60, 150, 3)
    img = base + rng.normal(0, 18, (h, w, 3))
    for _ in range(rng.integers(2, 5)):  # soft blotches
        cy, cx, s = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(8, 30)
        yy, xx = np.mgrid[0:h, 0:w]
        img += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))[..., None] * rng.uniform(-50, 50, 3)
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for _ in range(rng.integers(3, 8)):  # clutter lines in muted colours
        pts = [tuple(rng.uniform(0, [w, h])) for _ in range(2)]
        draw.line(pts, fill=tuple(int(c) for c in rng.uniform(50, 170, 3)), width=int(rng.integers(1, 3)))
    return pil


def _scene(h: int, w: int, rng: np.random.Generator, max_objects: int = 4) -> Tuple[Image.Image, List[Dict]]:
    """One image and its objects: dicts with class name, polygon and mask (bool HxW)."""
    img = _background(h, w, rng)
    objects: List[Dict] = []
    occupied = np.zeros((h, w), bool)
    for _ in range(20):  # rejection sampling for non-overlapping objects
        if len(objects) >= max_objects:
            break
        cls = DEMO_CLASSES[rng.integers(len(DEMO_CLASSES))]
        r = rng.uniform(0.09, 0.2) * min(h, w)
        cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
        poly = _polygon(cls, cx, cy, r, rng.uniform(0, 2 * math.pi))
        mask_img = Image.new('L', (w, h), 0)
        ImageDraw.Draw(mask_img).polygon(poly, fill=1)
        mask = np.array(mask_img, bool)
        if mask.sum() < 30 or (mask & occupied).any():
            continue
        occupied |= mask
        arr = np.array(img, np.float32)
        arr[mask] = _texture(cls, h, w, rng)[mask]
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
        objects.append(dict(cls=cls, polygon=poly, mask=mask))
    return img, objects


def _done(root: str, key: Dict) -> bool:
    marker = os.path.join(root, '.done')
    return os.path.isfile(marker) and json.load(open(marker)) == key


def make_ade20k(root: str, num_train: int = 160, num_val: int = 24, size: Tuple[int, int] = (128, 128),
                seed: int = 0) -> str:
    """Write a synthetic ADE20K-format data set under ``root`` (= ``.../ADEChallengeData2016``); returns ``root``."""
    key = dict(version=GENERATOR_VERSION, kind='ade20k', num_train=num_train, num_val=num_val, size=list(size),
               seed=seed)
    if _done(root, key):
        return root
    rng = np.random.default_rng(seed)
    h, w = size
    for split, n in (('training', num_train), ('validation', num_val)):
        os.makedirs(os.path.join(root, 'images', split), exist_ok=True)
        os.makedirs(os.path.join(root, 'annotations', split), exist_ok=True)
        for i in range(n):
            img, objects = _scene(h, w, rng)
            label = np.ones((h, w), np.uint8)  # 1 = background clutter (ADE: 0 is 'unlabelled')
            for obj in objects:
                label[obj['mask']] = SEG_CLASSES.index(obj['cls']) + 1
            name = f'ADE_{"train" if split == "training" else "val"}_{i:08d}'
            img.save(os.path.join(root, 'images', split, name + '.jpg'), quality=95)
            Image.fromarray(label).save(os.path.join(root, 'annotations', split, name + '.png'))
    json.dump(key, open(os.path.join(root, '.done'), 'w'))
    return root


def make_coco(root: str, num_train: int = 160, num_val: int = 24, size: Tuple[int, int] = (128, 160),
              seed: int = 1) -> str:
    """Write a synthetic COCO-instances-format data set under ``root`` (= ``.../coco``); returns ``root``."""
    key = dict(version=GENERATOR_VERSION, kind='coco', num_train=num_train, num_val=num_val, size=list(size),
               seed=seed)
    if _done(root, key):
        return root
    rng = np.random.default_rng(seed)
    h, w = size
    os.makedirs(os.path.join(root, 'annotations'), exist_ok=True)
    categories = [dict(id=i + 1, name=c, supercategory='shape') for i, c in enumerate(DEMO_CLASSES)]
    ann_id = 1
    for split, n in (('train2017', num_train), ('val2017', num_val)):
        os.makedirs(os.path.join(root, split), exist_ok=True)
        images, annotations = [], []
        for i in range(n):
            img, objects = _scene(h, w, rng)
            file_name = f'{split[:-4]}_{i:012d}.jpg'
            img.save(os.path.join(root, split, file_name), quality=95)
            image_id = i + 1
            images.append(dict(id=image_id, file_name=file_name, height=h, width=w))
            for obj in objects:
                ys, xs = np.nonzero(obj['mask'])
                x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
                annotations.append(dict(
                    id=ann_id, image_id=image_id, category_id=DEMO_CLASSES.index(obj['cls']) + 1, iscrowd=0,
                    bbox=[float(x0), float(y0), float(x1 - x0), float(y1 - y0)], area=float(obj['mask'].sum()),
                    segmentation=[[round(float(c), 2) for pt in obj['polygon'] for c in pt]]))
                ann_id += 1
        json.dump(dict(images=images, annotations=annotations, categories=categories),
                  open(os.path.join(root, 'annotations', f'instances_{split}.json'), 'w'))
    json.dump(key, open(os.path.join(root, '.done'), 'w'))
    return root
