# UperNet + SLaK-S on ADE20K: as SLaK-T but depth 27 in stage 3, drop path 0.3, 12 decay layers. Published: 49.4.
_base_ = './upernet_slak_t_ade20k.py'

checkpoint = None  # SLaK-S ImageNet weights (see upernet_slak_t_ade20k.py)

model = dict(backbone=dict(arch='small', drop_path_rate=0.3, init_cfg=dict(checkpoint=checkpoint)))
optim_wrapper = dict(paramwise_cfg=dict(num_layers=12))
