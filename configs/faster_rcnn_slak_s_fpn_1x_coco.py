# Faster R-CNN + FPN + SLaK-S on COCO, 1x: as the SLaK-T config with a depth-27 stage 3 (12 decay layers).
_base_ = './faster_rcnn_slak_t_fpn_1x_coco.py'

checkpoint = None  # SLaK-S ImageNet weights

model = dict(
    backbone=dict(arch='small', init_cfg=dict(checkpoint=checkpoint)),
    neck=dict(in_channels=[124, 249, 499, 998]))
optim_wrapper = dict(paramwise_cfg=dict(num_layers=12))
