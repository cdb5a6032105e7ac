"""slak_mm's registry scope: children of mmengine's root registries (the mmpretrain pattern).

Because these are children of the root, ``type='slak_mm.SLaK'`` (or ``'slak_mm.SparseTrainingHook'``, ...) resolves
from any mmdet / mmseg config: mmengine imports ``slak_mm.registry`` for the ``slak_mm.`` scope, then the
``locations`` below, so ``custom_imports`` is optional.
"""
from mmengine.registry import HOOKS as MMENGINE_HOOKS
from mmengine.registry import MODEL_WRAPPERS as MMENGINE_MODEL_WRAPPERS
from mmengine.registry import MODELS as MMENGINE_MODELS
from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS as MMENGINE_OPTIM_WRAPPER_CONSTRUCTORS
from mmengine.registry import Registry

MODELS = Registry('model', parent=MMENGINE_MODELS, scope='slak_mm', locations=['slak_mm.models'])
MODEL_WRAPPERS = Registry('model_wrapper', parent=MMENGINE_MODEL_WRAPPERS, scope='slak_mm',
                          locations=['slak_mm.env'])
HOOKS = Registry('hook', parent=MMENGINE_HOOKS, scope='slak_mm', locations=['slak_mm.engine'])
OPTIM_WRAPPER_CONSTRUCTORS = Registry('optimizer wrapper constructor', parent=MMENGINE_OPTIM_WRAPPER_CONSTRUCTORS,
                                      scope='slak_mm', locations=['slak_mm.engine'])
