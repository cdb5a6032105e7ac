"""Config loading with early validation, and runner construction for tools/ (segmentation and detection alike)."""
import itertools
import os.path as osp
from typing import Dict, Iterator, List, Optional, Tuple

from mmengine.config import Config, ConfigDict
from mmengine.runner import Runner

from .env import apply_runtime_fixes

README_DATA = "README section 'Data: real ADE20K / COCO' (or run `make demo` for the built-in data)"


class ConfigError(ValueError):
    """A config value that would make training or testing fail or silently do the wrong thing."""


ALL_SPLITS = ('train_dataloader', 'val_dataloader', 'test_dataloader')


def load_config(path: str, cfg_options: Optional[Dict] = None, work_dir: Optional[str] = None,
                launcher: str = 'none', check_data: bool = True, splits: Tuple[str, ...] = ALL_SPLITS) -> Config:
    """Load a config, apply overrides and validate it; ``splits`` are the dataloaders whose data must exist."""
    if not osp.isfile(path):
        raise ConfigError(f'config file {path} does not exist')
    cfg = Config.fromfile(path)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    cfg.launcher = launcher
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get('work_dir') is None:
        cfg.work_dir = osp.join('work_dirs', osp.splitext(osp.basename(path))[0])
    validate_config(cfg, check_data=check_data, splits=splits)
    return cfg


_RUNNERS_BUILT = itertools.count()


def build_runner(cfg: Config, launcher: str = 'none') -> Runner:
    apply_runtime_fixes(cfg, launcher)
    _own_visualizer(cfg)
    if 'runner_type' in cfg:
        from mmengine.registry import RUNNERS
        return RUNNERS.build(cfg)
    return Runner.from_cfg(cfg)


def _own_visualizer(cfg: Config) -> None:
    """mmengine keeps visualizers by name for the whole process, and the mm base configs all call theirs
    'visualizer'. A second runner of the same task in one process (the demo, a notebook, the tests) would get the
    first runner's visualizer back, and with it the first run's log folder: its config and scalars would land there,
    or fail if that folder is gone. Every runner after the first gets its own name."""
    vis = cfg.get('visualizer')
    n = next(_RUNNERS_BUILT)
    if isinstance(vis, dict) and n:
        vis['name'] = f"{vis.get('name') or 'visualizer'}_{n}"


# ---------------------------------------------------------------------------------------------------- validation
def _datasets(cfg: Config, splits: Tuple[str, ...] = ALL_SPLITS) -> Iterator[Tuple[str, ConfigDict]]:
    """(split, leaf dataset cfg) for the given dataloaders, looking through dataset wrappers."""
    for split in splits:
        loader = cfg.get(split)
        if not loader:
            continue
        stack = [loader.get('dataset')]
        while stack:
            ds = stack.pop()
            if ds is None:
                continue
            if 'datasets' in ds:
                stack.extend(ds['datasets'])
            elif 'dataset' in ds:
                stack.append(ds['dataset'])
            else:
                yield split, ds


def _dataset_classes(cfg: Config, ds: ConfigDict) -> Optional[Tuple[str, ...]]:
    classes = (ds.get('metainfo') or {}).get('classes')
    if classes is not None:
        return tuple(classes)
    scope = cfg.get('default_scope')
    if scope == 'mmseg':
        from mmseg.registry import DATASETS
    elif scope == 'mmdet':
        from mmdet.registry import DATASETS
    else:
        return None
    cls = DATASETS.get(ds['type']) if isinstance(ds['type'], str) else ds['type']
    meta = getattr(cls, 'METAINFO', None) or {}
    return tuple(meta['classes']) if 'classes' in meta else None


def _head_num_classes(model: ConfigDict) -> List[Tuple[str, int]]:
    found = []
    for name in ('decode_head', 'auxiliary_head'):
        heads = model.get(name)
        for i, head in enumerate(heads if isinstance(heads, list) else [heads] if heads else []):
            if 'num_classes' in head:
                found.append((f'model.{name}' + (f'[{i}]' if isinstance(heads, list) else ''), head.num_classes))
    roi = model.get('roi_head') or {}
    for name in ('bbox_head', 'mask_head'):
        heads = roi.get(name)
        for i, head in enumerate(heads if isinstance(heads, list) else [heads] if heads else []):
            if 'num_classes' in head:
                found.append((f'model.roi_head.{name}' + (f'[{i}]' if isinstance(heads, list) else ''),
                              head.num_classes))
    if 'bbox_head' in model and 'num_classes' in model.bbox_head:  # one-stage detectors
        found.append(('model.bbox_head', model.bbox_head.num_classes))
    return found


def validate_config(cfg: Config, check_data: bool = True, splits: Tuple[str, ...] = ALL_SPLITS) -> None:
    """Raise :class:`ConfigError` for a missing data root or head ``num_classes`` that disagree with the dataset."""
    datasets = list(_datasets(cfg, splits))
    if check_data:
        for split, ds in datasets:
            root = ds.get('data_root')
            if root and not osp.isdir(root):
                raise ConfigError(
                    f'{split}: data root {root!r} does not exist. Put the data set there (expected layout: '
                    f'{README_DATA}) or point the config at it, e.g. --cfg-options '
                    f'{split}.dataset.data_root=/path/to/data')
    model = cfg.get('model') or {}
    for split, ds in datasets:
        classes = _dataset_classes(cfg, ds)
        if classes is None:
            continue
        for where, n in _head_num_classes(model):
            if n != len(classes):
                raise ConfigError(f'{where}.num_classes={n} but the {split} dataset ({ds["type"]}) has '
                                  f'{len(classes)} classes; set {where}.num_classes={len(classes)} or change the '
                                  f"dataset's metainfo.classes")


# ---------------------------------------------------------------------------------------------------- inference
def predict_and_draw(cfg: Config, checkpoint: str, image: str, out_file: str,
                     class_names: Optional[Tuple[str, ...]] = None):
    """Run a segmentor or detector (by the config's scope) on one image and save the overlay PNG. Returns the result.

    ``class_names`` relabels the first classes for display only (the demo's synthetic classes use ADE20K ids 1-5).
    """
    import mmcv
    from mmengine.registry import VISUALIZERS

    from .env import trust_local_mmengine_checkpoints
    if not osp.isfile(image):
        raise FileNotFoundError(f'image {image} does not exist')
    try:
        img = mmcv.imread(image, channel_order='rgb')
    except Exception as e:  # noqa: BLE001 - anything cv2/PIL raise on a non-image
        raise ValueError(f'{image} is not a readable image ({e})') from None
    if img is None:
        raise ValueError(f'{image} is not a readable image')
    trust_local_mmengine_checkpoints()  # the user's own training checkpoint
    scope = cfg.get('default_scope')
    if scope == 'mmseg':
        from mmseg.apis import inference_model, init_model
        model = init_model(cfg, checkpoint, device='cpu')
        result = inference_model(model, image)
    elif scope == 'mmdet':
        from mmdet.apis import inference_detector, init_detector
        model = init_detector(cfg, checkpoint, device='cpu')
        result = inference_detector(model, image)
    else:
        raise ConfigError(f"predict_and_draw: config default_scope must be 'mmseg' or 'mmdet', got {scope!r}")
    vis_cfg = dict(cfg.visualizer)
    vis_cfg.update(name=f'slak_mm_predict_{id(model)}', vis_backends=None, save_dir=None)
    with_scope = scope + '.' + vis_cfg['type'] if '.' not in vis_cfg['type'] else vis_cfg['type']
    visualizer = VISUALIZERS.build(dict(vis_cfg, type=with_scope))
    meta = dict(model.dataset_meta)
    if class_names:
        meta['classes'] = tuple(class_names) + tuple(meta['classes'][len(class_names):])
    visualizer.dataset_meta = meta
    visualizer.add_datasample('prediction', img, result, draw_gt=False, draw_pred=True, show=False,
                              out_file=out_file)
    return result
