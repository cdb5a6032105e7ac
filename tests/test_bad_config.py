"""Bad config input raises one clear error before any training starts."""
import os

import pytest

from slak_mm.apis import ConfigError, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_missing_data_root_names_path_and_readme_section(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(os.path.join(ROOT, 'configs/upernet_slak_t_ade20k.py'),
                    {'train_dataloader.dataset.data_root': str(tmp_path / 'nowhere')})
    assert str(tmp_path / 'nowhere') in str(e.value) and 'README' in str(e.value)


def test_head_num_classes_must_match_dataset_seg(demo_data):
    opts = {f'{s}.dataset.data_root': demo_data['ade'] for s in ('train_dataloader', 'val_dataloader',
                                                                 'test_dataloader')}
    opts['model.decode_head.num_classes'] = 19
    with pytest.raises(ConfigError, match=r'decode_head.num_classes=19 .* 150 classes'):
        load_config(os.path.join(ROOT, 'configs/upernet_slak_t_ade20k.py'), opts)


def test_head_num_classes_must_match_dataset_det(demo_data):
    opts = {f'{s}.dataset.data_root': demo_data['coco'] for s in ('train_dataloader', 'val_dataloader',
                                                                  'test_dataloader')}
    opts['model.roi_head.bbox_head.num_classes'] = 80  # the demo dataset has 4 classes
    with pytest.raises(ConfigError, match=r'bbox_head.num_classes=80 .* 4 classes'):
        load_config(os.path.join(ROOT, 'configs/demo/faster_rcnn_slak_demo.py'), opts)


def test_missing_config_file():
    with pytest.raises(ConfigError, match='does not exist'):
        load_config('configs/nope.py')


def test_testing_needs_only_the_test_data(demo_data, tmp_path):
    opts = {'train_dataloader.dataset.data_root': str(tmp_path / 'no_train_data'),
            'test_dataloader.dataset.data_root': demo_data['ade']}
    cfg = load_config(os.path.join(ROOT, 'configs/demo/upernet_slak_demo.py'), opts, splits=('test_dataloader',))
    assert cfg.test_dataloader.dataset.data_root == demo_data['ade']
    with pytest.raises(ConfigError, match='no_train_data'):
        load_config(os.path.join(ROOT, 'configs/demo/upernet_slak_demo.py'), opts)
