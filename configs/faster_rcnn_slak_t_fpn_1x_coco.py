# Faster R-CNN + FPN + SLaK-T on COCO, 1x (12 epochs, lr steps at 8 and 11): AdamW 1e-4 / wd 0.05 with the
# layer-wise lr decay of the Cascade recipe (0.7, 6 layers). No published SLaK number exists for this pairing.
_base_ = 'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py'

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

optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    constructor='slak_mm.LayerDecayOptimizerConstructor',
    paramwise_cfg=dict(decay_rate=0.7, decay_type='layer_wise', num_layers=6))

# Sparse fine-tuning as the reference (slak_reference.md §7.6): with a sparse SLaK checkpoint its zeros are kept as
# fixed masks; with dense (or no) pretrained weights training is dense. mode='dynamic' prunes and regrows instead.
custom_hooks = [dict(type='slak_mm.SparseTrainingHook', mode='auto')]
