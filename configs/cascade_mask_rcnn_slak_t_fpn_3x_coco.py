# Cascade Mask R-CNN + FPN + SLaK-T on COCO, the reference recipe (slak_reference.md §7.4): 4conv1fc box heads with
# GIoU, multi-scale 480-800 training with the DETR-style crop augmentation, AdamW 2e-4 / wd 0.05 with layer-wise lr
# decay 0.7 (6 layers), 36 epochs with steps at 27 and 33, drop path 0.4, fp32. Published: 51.3 box AP / 44.3 mask AP.
# The heads, pipeline and schedule are mmdet's ConvNeXt-T Cascade 3x config; only backbone and optimizer differ.
_base_ = 'mmdet::convnext/cascade-mask-rcnn_convnext-t-p4-w7_fpn_4conv1fc-giou_amp-ms-crop-3x_coco.py'
custom_imports = dict(imports=['slak_mm'], allow_failed_imports=False)  # replaces the base's mmpretrain import

checkpoint = None  # SLaK-T ImageNet weights (official or converted); None trains from scratch

model = dict(
    backbone=dict(
        _delete_=True,
        type='slak_mm.SLaK',
        arch='tiny',
        kernel_size=[51, 49, 47, 13, 5],
        width_factor=1.3,
        drop_path_rate=0.4,
        layer_scale_init_value=1.0,
        out_indices=(0, 1, 2, 3),
        norm_cfg=dict(type='SyncBN', requires_grad=True),
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint)),
    neck=dict(in_channels=[124, 249, 499, 998]))

param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=500),
    dict(type='MultiStepLR', begin=0, end=36, by_epoch=True, milestones=[27, 33], gamma=0.1),
]
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',  # the reference trains fp32; use tools/train.py --amp for mixed precision
    optimizer=dict(type='AdamW', lr=2e-4, betas=(0.9, 0.999), weight_decay=0.05),
    constructor='slak_mm.LayerDecayOptimizerConstructor',
    paramwise_cfg=dict(decay_rate=0.7, decay_type='layer_wise', num_layers=6))

# Sparse fine-tuning as the reference (slak_reference.md §7.6): with a sparse SLaK checkpoint its zeros are kept as
# fixed masks; with dense (or no) pretrained weights training is dense. mode='dynamic' prunes and regrows instead.
custom_hooks = [dict(type='slak_mm.SparseTrainingHook', mode='auto')]
