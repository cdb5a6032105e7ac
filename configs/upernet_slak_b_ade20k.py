# UperNet + SLaK-B on ADE20K: base widths (166/332/665/1331 after x1.3), drop path 0.4, 12 decay layers.
# Published: 50.0 (README; PeLK reports 50.2).
_base_ = './upernet_slak_t_ade20k.py'

checkpoint = None  # SLaK-B ImageNet weights (see upernet_slak_t_ade20k.py)

model = dict(
    backbone=dict(arch='base', drop_path_rate=0.4, init_cfg=dict(checkpoint=checkpoint)),
    decode_head=dict(in_channels=[166, 332, 665, 1331]),
    auxiliary_head=dict(in_channels=665))
optim_wrapper = dict(paramwise_cfg=dict(num_layers=12))
