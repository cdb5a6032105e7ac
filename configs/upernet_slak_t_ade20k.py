# UperNet + SLaK-T on ADE20K, the reference recipe (slak_reference.md §7.3): 512x512 crops, 160k iterations,
# 16 images per iteration (4 GPUs x 4), AdamW 1e-4 / wd 0.05 with stage-wise lr decay 0.9, poly schedule with a
# 1500-iteration linear warm-up, slide inference 512 / stride 341. Published: 47.6 mIoU (single scale).
_base_ = 'mmseg::upernet/upernet_r50_4xb4-160k_ade20k-512x512.py'

# Pretrained SLaK-T ImageNet weights: an official checkpoint as released, or one converted with
# tools/convert_slak_checkpoint.py. None trains from scratch (one warning is logged).
checkpoint = None

crop_size = (512, 512)
norm_cfg = dict(type='SyncBN', requires_grad=True)
model = dict(
    pretrained=None,
    backbone=dict(
        _delete_=True,
        type='slak_mm.SLaK',
        arch='tiny',
        kernel_size=[51, 49, 47, 13, 5],
        width_factor=1.3,
        drop_path_rate=0.4,
        layer_scale_init_value=1.0,  # overwritten by the pretrained gamma
        out_indices=(0, 1, 2, 3),
        norm_cfg=norm_cfg,
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint)),
    decode_head=dict(in_channels=[124, 249, 499, 998], num_classes=150),
    auxiliary_head=dict(in_channels=499, num_classes=150),
    test_cfg=dict(mode='slide', crop_size=crop_size, stride=(341, 341)))

optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=1e-4, betas=(0.9, 0.999), weight_decay=0.05),
    constructor='slak_mm.LayerDecayOptimizerConstructor',
    paramwise_cfg=dict(decay_rate=0.9, decay_type='stage_wise', num_layers=6))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type='PolyLR', power=1.0, eta_min=0.0, by_epoch=False, begin=1500, end=160000),
]
train_dataloader = dict(batch_size=4)  # x 4 GPUs = 16 images per iteration
train_cfg = dict(val_interval=4000)
default_hooks = dict(checkpoint=dict(interval=8000, max_keep_ckpts=3))

# Sparse fine-tuning as the reference (slak_reference.md §7.6): with a sparse SLaK checkpoint its zeros are kept as
# fixed masks; with dense (or no) pretrained weights training is dense. mode='dynamic' prunes and regrows instead.
custom_hooks = [dict(type='slak_mm.SparseTrainingHook', mode='auto')]
