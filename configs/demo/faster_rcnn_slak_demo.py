# Demo: Faster R-CNN + FPN + a reduced SLaK on the built-in synthetic COCO-format data (4 shape classes), sized for
# a 2-core CPU. Inherits the real SLaK-T Faster R-CNN config; changes only data, sizes, schedule length and the
# backbone's width/depth (the large kernels stay [51, 49, 47, 13, 5]). Trains from scratch (higher lr).
_base_ = '../faster_rcnn_slak_t_fpn_1x_coco.py'

data_root = 'data/demo/coco/'
classes = ('disc', 'square', 'triangle', 'cross')
metainfo = dict(classes=classes, palette=[(220, 20, 60), (0, 160, 80), (30, 60, 220), (230, 200, 0)])
img_scale = (160, 128)
max_iters = 250
fpn_channels = 64

model = dict(
    backbone=dict(arch=dict(_delete_=True, depths=[1, 1, 2, 1], dims=[32, 64, 128, 256]), width_factor=1.0,
                  drop_path_rate=0.1, layer_scale_init_value=1e-6, norm_cfg=dict(type='BN', requires_grad=True)),
    neck=dict(in_channels=[32, 64, 128, 256], out_channels=fpn_channels),
    rpn_head=dict(in_channels=fpn_channels, feat_channels=fpn_channels),
    roi_head=dict(
        bbox_roi_extractor=dict(out_channels=fpn_channels),
        bbox_head=dict(in_channels=fpn_channels, fc_out_channels=256, num_classes=len(classes))))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=img_scale, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
train_dataloader = dict(
    batch_size=4, num_workers=2,
    sampler=dict(type='InfiniteSampler', shuffle=True), batch_sampler=None,
    dataset=dict(data_root=data_root, metainfo=metainfo, pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=4, num_workers=2,
    dataset=dict(data_root=data_root, metainfo=metainfo, pipeline=test_pipeline))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file=data_root + 'annotations/instances_val2017.json')
test_evaluator = val_evaluator

optim_wrapper = dict(optimizer=dict(lr=1e-3), paramwise_cfg=dict(decay_rate=1.0))  # from scratch: no lr decay
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=False, begin=0, end=30),
    dict(type='MultiStepLR', by_epoch=False, begin=0, end=max_iters, milestones=[int(max_iters * 0.8)], gamma=0.1),
]
train_cfg = dict(_delete_=True, type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters)
default_hooks = dict(logger=dict(interval=50), checkpoint=dict(by_epoch=False, interval=max_iters, max_keep_ckpts=1))
log_processor = dict(by_epoch=False)
env_cfg = dict(cudnn_benchmark=False)
