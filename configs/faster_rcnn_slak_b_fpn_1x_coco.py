# Faster R-CNN + FPN + SLaK-B on COCO, 1x: as the SLaK-T config with a depth-27 stage 3 (12 decay layers).
_base_ = './faster_rcnn_slak_t_fpn_1x_coco.py'

checkpoint = None  # SLaK-B ImageNet weights

model = dict(
    backbone=dict(arch='base', init_cfg=dict(checkpoint=checkpoint)),
    neck=dict(in_channels=[166, 332, 665, 1331]))
optim_wrapper = dict(paramwise_cfg=dict(num_layers=12))
