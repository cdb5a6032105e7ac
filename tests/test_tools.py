"""Tools end to end: ONNX export vs onnxruntime, MAC/parameter counts vs the reference, deploy -> test."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from helpers import run_options
from slak_mm.analysis import count_macs
from slak_mm.models import SLaK
from slak_mm.sparse import SparseMasks, select_parameters

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'tools'))
DEMO_SEG = os.path.join(ROOT, 'configs/demo/upernet_slak_demo.py')


def _run(*args):
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=ROOT), timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.mark.parametrize('which,shape', [('backbone', (96, 128)), ('segmentor', (128, 96))])
def test_onnx_export_matches_pytorch(tmp_path, which, shape):
    import export_onnx
    model = export_onnx.build_deployed(DEMO_SEG, 'none')
    out = str(tmp_path / f'{which}.onnx')
    net = export_onnx.export(model, which, out, shape)
    sizes = [shape, (shape[0] + 64, shape[1] - 32)] if which == 'backbone' else [shape]  # dynamic H/W
    assert export_onnx.verify(net, out, sizes, batch=2 if which == 'backbone' else 1) <= 1e-4


@pytest.mark.parametrize('arch,dense_g,params_m', [('tiny', 8.70, 49.71), ('small', 16.60, 90.13),
                                                   ('base', 28.51, 156.62)])
def test_dense_and_nonzero_macs_match_reference(arch, dense_g, params_m):
    model = SLaK(arch).eval()
    x = torch.randn(1, 3, 224, 224)
    dense = count_macs(model, lambda: model(x))['model']
    assert dense['macs'] / 1e9 == pytest.approx(dense_g, abs=0.01)
    # reference + 1.0 M ImageNet head = 50.7/91.1/158.0
    assert dense['params'] / 1e6 == pytest.approx(params_m, abs=0.01)
    masks = SparseMasks(select_parameters(model, 'backbone'))
    masks.init('uniform', 0.4, dense_threshold=1.01)  # a model at 40% sparsity
    sparse = count_macs(model, lambda: model(x))['model']
    assert sparse['nonzero_macs'] / 1e9 == pytest.approx(0.6 * dense_g, abs=0.02)  # ≈ 5.2 / 10.0 / 17.1 G
    assert sparse['macs'] == dense['macs']


def test_get_flops_cli_reports_backbone_and_model():
    out = _run('tools/get_flops.py', 'configs/upernet_slak_t_ade20k.py', '--shape', '224', '224')
    row = re.search(r'\| backbone \| ([\d.]+) M \| ([\d.]+) M \| ([\d.]+) G \| ([\d.]+) G \|', out)
    assert row and float(row.group(3)) == pytest.approx(8.70, abs=0.01)
    model = re.search(r'\| model \| ([\d.]+) M \| [\d.]+ M \| ([\d.]+) G', out)
    assert model and float(model.group(2)) > float(row.group(3))  # decode heads add work


def test_deploy_tool_then_test_tool_give_identical_metrics(demo_data, tmp_path):
    from slak_mm.apis import build_runner, load_config
    opts = run_options(demo_data['ade'], 2)
    build_runner(load_config(DEMO_SEG, opts, work_dir=str(tmp_path / 'train'))).train()
    ckpt = str(tmp_path / 'train' / 'iter_2.pth')
    deployed = str(tmp_path / 'deployed.pth')
    _run('tools/deploy.py', DEMO_SEG, ckpt, deployed)
    cli = [f'{k}={v}' for k, v in opts.items() if k.startswith(('val_', 'test_'))]
    a = _run('tools/test.py', DEMO_SEG, ckpt, '--work-dir', str(tmp_path / 't1'), '--cfg-options', *cli)
    b = _run('tools/test.py', DEMO_SEG, deployed, '--work-dir', str(tmp_path / 't2'), '--cfg-options', *cli,
             'model.backbone.deploy=True')
    miou = [re.findall(r'mIoU: ([\d.]+)', s)[-1] for s in (a, b)]
    acc = [re.findall(r'aAcc: ([\d.]+)', s)[-1] for s in (a, b)]
    assert miou[0] == miou[1] and acc[0] == acc[1]
    sd = torch.load(deployed, weights_only=False)['state_dict']
    assert any('large_kernel.merged.weight' in k for k in sd) and not any('.tall.' in k for k in sd)


@pytest.fixture(scope='module')
def gpu_checks_smoke(tmp_path_factory):
    """tools/gpu_checks.sh, the one command a lent GPU machine runs, in its CPU smoke mode (GPU_CHECKS_SMOKE=1: every
    step at tiny sizes, the Triton kernels under the interpreter), with the mm packages made unimportable, as on the
    GPU machine (torch, Triton and timm only)."""
    out = tmp_path_factory.mktemp('gpu')
    no_mm = tmp_path_factory.mktemp('no_mm')
    (no_mm / 'sitecustomize.py').write_text(
        'import sys\n'
        'class NoMM:\n'
        '    def find_spec(self, name, path=None, target=None):\n'
        "        if name.split('.')[0] in ('mmengine', 'mmcv', 'mmseg', 'mmdet'):\n"
        "            raise ImportError(f'{name}: not on the GPU machine')\n"
        'sys.meta_path.insert(0, NoMM())\n')
    proc = subprocess.run(['bash', 'tools/gpu_checks.sh'], capture_output=True, text=True, cwd=ROOT, timeout=900,
                          env=dict(os.environ, OUT=str(out), PY=sys.executable, GPU_CHECKS_SMOKE='1',
                                   PYTHONPATH=str(no_mm)))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    return out


def test_gpu_checks_results_fit_what_a_lent_machine_sends_back(gpu_checks_smoke):
    """A device call returns at most 8 files, named in letters, digits, '.', '_' and '-': the script writes one log and
    six JSON files, each finished (complete) and holding its rows; the log records every step's exit status."""
    import json
    files = sorted(str(p.relative_to(gpu_checks_smoke)) for p in gpu_checks_smoke.rglob('*') if p.is_file())
    assert files == ['backbone_amp.json', 'backbone_fp32.json', 'dwconv_all.json', 'dwconv_bf16.json',
                     'gpu_checks.log', 'triton_check.json', 'triton_tiles.json']
    assert len(files) <= 8 and all(re.fullmatch(r'[A-Za-z0-9._-]+', f) for f in files)
    res = {f: json.load(open(gpu_checks_smoke / f)) for f in files if f.endswith('.json')}
    assert all(r['complete'] for r in res.values())
    assert {(r['phase'], r['stage']) for r in res['dwconv_bf16.json']['rows']} == {
        (p, s) for p in ('fwd_bwd', 'eval_sum') for s in range(4)}
    for name in ('backbone_amp.json', 'backbone_fp32.json'):
        assert [r['model'] for r in res[name]['results']] == ['slak_t', 'convnext_tiny']
        assert all(r['train_ms'] > 0 for r in res[name]['results'])
    assert res['backbone_amp.json']['amp'] and not res['backbone_fp32.json']['amp']
    log = (gpu_checks_smoke / 'gpu_checks.log').read_text()
    assert len(re.findall(r'^== .*: exit 0 after \d+s$', log, re.M)) == 6
    assert 'every step finished' in log and 'triton 3.' in log
    # the log ends with gpu_report.py's summary of the targets, from these files (smoke: bf16 on CPU, tiny maps)
    assert 'Kernel check: 8 cases, 0 above tolerance' in log
    assert len(re.findall(r'^\| fused unit .* \| 64 stage [12], .* ours \(torch\) .* \*\*(not )?met\*\* \|$', log,
                          re.M)) == 2  # on CPU, 'auto' runs PyTorch's convolutions, and the report says so
    train_row = r'^\| SLaK-T training step .* \| 64, batch 1, .*, depthwise: torch \| .* \*\*(not )?met\*\* \|$'
    assert len(re.findall(train_row, log, re.M)) == 2


def test_gpu_report_judges_the_targets_from_the_files_alone(tmp_path):
    """tools/gpu_report.py: the unit target is the speed-up over the faster of the two nn.Conv2d layouts, bf16
    forward + backward at stages 1-2 only; the training target is SLaK-T's step over ConvNeXt-T's; a file cut short
    or missing is reported as such, and a target with no rows as not measured."""
    import json
    from gpu_report import report

    def unit(stage, dtype, phase, ours, nchw, cl):
        return dict(input='224', stage=stage, shape=[32, 249, 28, 28], dtype=dtype, phase=phase,
                    ours_impl='triton', ms=dict(ours=ours, nchw=nchw, cl=cl))
    rows = [unit(1, 'bfloat16', 'fwd_bwd', 2.0, 10.0, 5.8),   # 2.9x the faster (cl): not met
            unit(2, 'bfloat16', 'fwd_bwd', 1.0, 3.2, 4.0),    # 3.2x (nchw): met
            unit(0, 'bfloat16', 'fwd_bwd', 1.0, 1.0, 1.0),    # stage 0: no target
            unit(1, 'float32', 'fwd_bwd', 1.0, 1.0, 1.0),     # fp32: no target
            unit(1, 'bfloat16', 'forward', 1.0, 1.0, 1.0)]    # forward alone: no target
    json.dump(dict(device='GPU X', rows=rows, complete=True), open(tmp_path / 'dwconv_bf16.json', 'w'))
    json.dump(dict(device='GPU X', results=[
        dict(model='slak_t', size='224', batch=32, train_ms=170.0, train_ratio_vs_base=1.70, peak_train_gib=9.5),
        dict(model='convnext_tiny', size='224', batch=32, train_ms=100.0, train_ratio_vs_base=1.0)],
        complete=False, dwconv_auto='triton'), open(tmp_path / 'backbone_amp.json', 'w'))
    text = report(str(tmp_path))
    assert text.startswith('# GPU checks on GPU X')
    assert 'dwconv_bf16.json: complete' in text and 'backbone_amp.json: cut short' in text
    assert 'dwconv_all.json: missing' in text
    lines = [line for line in text.splitlines() if line.startswith('| fused unit')]
    assert len(lines) == 2
    assert '224 stage 1' in lines[0] and '2.90× the faster nn.Conv2d (cl)' in lines[0] and '**not met**' in lines[0]
    assert '224 stage 2' in lines[1] and '3.20× the faster nn.Conv2d (nchw)' in lines[1] and '**met**' in lines[1]
    assert all('ours (triton) ' in line for line in lines)
    train = [line for line in text.splitlines() if line.startswith('| SLaK-T training step')]
    assert '1.70× ConvNeXt-T' in train[0] and 'peak 9.50 GiB' in train[0] and '**not met**' in train[0]
    assert 'bf16 autocast, depthwise: triton |' in train[0]
    assert 'fp32 | no slak_t training rows | not measured' in train[1]


def test_gpu_kernel_check_script_self_test(gpu_checks_smoke):
    """tools/check_triton_gpu.py (gpu_checks.sh's first step) in its CPU self-test mode: it runs the Triton kernels
    (interpreter) at tiny stage shapes and reports errors under the stated tolerance."""
    import json
    rows = json.load(open(gpu_checks_smoke / 'triton_check.json'))['rows']
    assert len(rows) == 2 * 2 * 2 and all(r['ok'] for r in rows)
    assert {r['dtype'] for r in rows} == {'float32', 'bfloat16'}
    assert all(0 < r['weight_grad'] <= 1e-4 for r in rows if r['dtype'] == 'float32')


def test_triton_tile_sweep_checks_every_configuration(gpu_checks_smoke):
    """tools/sweep_triton_tiles.py (a gpu_checks.sh step) checks each tile size and warp count it would time against
    F.conv2d first; its CPU self-test (interpreter, no timing) does that on a shape where the tile sizes give different
    program shapes, forward and weight gradient."""
    import json
    from slak_mm.ops.triton_dwconv import _blocks
    import sweep_triton_tiles as sweep
    assert len({_blocks(40, 33, e) for e, _ in sweep.FORWARD}) == len({e for e, _ in sweep.FORWARD}) > 1
    assert len({_blocks(40, 33, e) for e, _ in sweep.WGRAD}) == len({e for e, _ in sweep.WGRAD}) > 1
    result = json.load(open(gpu_checks_smoke / 'triton_tiles.json'))
    assert not result['wrong']
    got = {(r['kernel'], r['elems'], r['warps']) for r in result['rows']}
    assert got == {('forward', e, w) for e, w in sweep.FORWARD} | {('wgrad', e, w) for e, w in sweep.WGRAD}
    assert all(0 < r['rel_err'] <= 1.6e-2 and r['shape'] == [1, 40, 5, 33] for r in result['rows'])


def test_gpu_checks_budget_and_missing_gpu(tmp_path):
    """Without a GPU (and no smoke mode) the script stops at once, saying what to run instead; with its time budget
    spent, a step is not started, and no benchmark runs after a kernel check that did not pass."""
    env = dict(os.environ, OUT=str(tmp_path / 'a'), PY=sys.executable, CUDA_VISIBLE_DEVICES='')
    proc = subprocess.run(['bash', 'tools/gpu_checks.sh'], capture_output=True, text=True, cwd=ROOT, env=env)
    assert proc.returncode == 1 and 'no CUDA device' in proc.stdout and 'GPU_CHECKS_SMOKE=1' in proc.stdout
    env.update(OUT=str(tmp_path / 'b'), GPU_CHECKS_SMOKE='1', GPU_CHECKS_BUDGET='0')
    proc = subprocess.run(['bash', 'tools/gpu_checks.sh'], capture_output=True, text=True, cwd=ROOT, env=env)
    assert proc.returncode == 1
    assert '== kernel check: not run, the 0s budget is spent' in proc.stdout
    assert 'no benchmarks' in proc.stdout and '== unit' not in proc.stdout
    assert sorted(p.name for p in (tmp_path / 'b').iterdir()) == ['gpu_checks.log']


def test_benchmark_writes_its_json_after_every_row(monkeypatch, tmp_path):
    """A benchmark stopped part-way (a lent GPU's time limit) keeps the rows it finished: benchmark_dwconv.py
    rewrites its JSON after each row, marked incomplete, and marks it complete only at the end."""
    import benchmark_dwconv
    writes = []
    monkeypatch.setattr(benchmark_dwconv, 'write_json',
                        lambda path, payload: writes.append((path, len(payload['rows']), payload['complete'])))
    out = str(tmp_path / 'd.json')
    monkeypatch.setattr(sys, 'argv', ['benchmark_dwconv.py', '--sizes', '32', '--batch', '1', '--phases', 'forward',
                                      '--repeats', '1', '--json', out])
    benchmark_dwconv.main()
    assert writes == [(out, n, False) for n in range(1, 5)] + [(out, 4, True)]


def test_unit_benchmark_autocast_runs_every_implementation_under_autocast(monkeypatch, tmp_path):
    """--autocast: float32 tensors, each implementation's forward under torch.autocast (bf16 outputs, float32 weight
    gradients for float32 kernels), rows labelled 'bfloat16 autocast'; --autocast with only float32 is refused."""
    import benchmark_dwconv
    torch.manual_seed(0)
    x = torch.randn(1, 4, 9, 9)
    kernels = [torch.randn(4, 1, *k) for k in ((7, 3), (3, 7), (3, 3))]
    for name, fn in benchmark_dwconv.make_fns(x, kernels, 'eval_sum', torch.bfloat16).items():
        assert fn().dtype == torch.bfloat16, name
    for name, fn in benchmark_dwconv.make_fns(x, kernels, 'weight_grad', torch.bfloat16).items():
        assert all(g.dtype == torch.float32 for g in fn()), name
    assert benchmark_dwconv.make_fns(x, kernels, 'eval_sum')['ours']().dtype == torch.float32
    out = tmp_path / 'a.json'
    monkeypatch.setattr(sys, 'argv', ['benchmark_dwconv.py', '--sizes', '32', '--batch', '1', '--phases', 'eval_sum',
                                      '--repeats', '1', '--autocast', '--json', str(out)])
    benchmark_dwconv.main()
    rows = json.loads(out.read_text())['rows']
    assert len(rows) == 4 and {r['dtype'] for r in rows} == {'bfloat16 autocast'}
    proc = subprocess.run([sys.executable, 'tools/benchmark_dwconv.py', '--autocast', '--dtypes', 'float32'],
                          capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), timeout=300)
    assert proc.returncode == 2 and 'other than float32' in proc.stderr


def test_interleaved_timing_shuffles_the_order_and_pairs_the_ratios():
    # The benchmark statistics, without timing anything: every function runs warmup + repeats times, the order changes
    # between repeats (a fixed order charges cache eviction to the same function), and the ratio is taken per repeat.
    from slak_mm.benchmark_utils import paired_ratio, time_interleaved_samples
    calls = []
    fns = {k: (lambda k=k: calls.append(k)) for k in 'abcd'}
    samples = time_interleaved_samples(fns, torch.device('cpu'), repeats=6, warmup=2)
    assert all(len(v) == 6 and min(v) >= 0 for v in samples.values())
    assert sorted(calls[:8]) == sorted('abcd' * 2)  # warm-up, in order
    rounds = [tuple(calls[8 + 4 * i: 12 + 4 * i]) for i in range(6)]
    assert all(sorted(r) == list('abcd') for r in rounds) and len(set(rounds)) > 1
    # a machine that slows down 10x in the second half: per-repeat ratios stay put, and so does their median
    slow = {'m': [2.0, 2.0, 2.2, 20.0, 22.0, 22.0], 'base': [1.0, 1.0, 1.0, 10.0, 10.0, 10.0]}
    median, q1, q3 = paired_ratio(slow, 'm', 'base')
    assert median == pytest.approx(2.1) and q1 == pytest.approx(2.0) and q3 == pytest.approx(2.2)
    assert paired_ratio({'m': [3.0], 'base': [1.5]}, 'm', 'base') == (2.0, 2.0, 2.0)


def test_interleaved_timing_with_back_to_back_calls_reports_time_per_call(monkeypatch):
    # calls=3: each sample is three consecutive calls of one function (warm caches after the first), divided by 3
    import types
    from slak_mm import benchmark_utils
    calls, clock = [], [0.0]

    def fn(k, cost):
        def run():
            calls.append(k)
            clock[0] += cost
        return run
    fns = {'a': fn('a', 3.0), 'b': fn('b', 6.0)}
    # a fake clock: each call advances it by its function's cost
    monkeypatch.setattr(benchmark_utils, 'time', types.SimpleNamespace(perf_counter=lambda: clock[0]))
    samples = benchmark_utils.time_interleaved_samples(fns, torch.device('cpu'), repeats=4, warmup=1, calls=3)
    assert samples == {'a': [3.0] * 4, 'b': [6.0] * 4}
    timed = calls[2:]
    assert all(len(set(timed[i:i + 3])) == 1 for i in range(0, len(timed), 3))  # back to back, not interleaved
    assert len(timed) == 2 * 4 * 3
    with pytest.raises(ValueError, match='calls must be >= 1'):
        benchmark_utils.time_interleaved_samples(fns, torch.device('cpu'), calls=0)


def test_benchmark_sizes_parse_hxw_and_reject_bad_ones_before_timing():
    # Both benchmarks take N or HxW (the detection input 800x1344 is not square); a bad size stops the tool at once.
    from slak_mm.benchmark_utils import parse_size, size_label
    assert parse_size('512') == (512, 512) and parse_size('800x1344') == (800, 1344)
    assert size_label((512, 512)) == '512' and size_label((800, 1344)) == '800x1344'
    for bad in ('800x', 'x1344', 'big', '16', '800x16', '8x8x8'):
        with pytest.raises(ValueError, match=r'N or HxW'):
            parse_size(bad)
    for tool in ('tools/benchmark.py', 'tools/benchmark_dwconv.py'):
        proc = subprocess.run([sys.executable, tool, '--sizes', '512', '800by1344'], capture_output=True, text=True,
                              cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), timeout=300)
        assert proc.returncode == 2 and "'800by1344'" in proc.stderr and 'HxW' in proc.stderr, proc.stderr[-2000:]
        assert '|' not in proc.stdout  # no table: nothing was timed


def test_backbone_benchmark_dtype_runs_the_models_in_that_dtype(monkeypatch, tmp_path):
    # --dtype bfloat16: models and input converted (no autocast), recorded in the JSON; with --amp it is refused.
    sys.path.insert(0, os.path.join(ROOT, 'tools'))
    import benchmark
    seen = []
    real_build = benchmark.build

    def build(name, device):
        model = real_build(name, device)
        model.register_forward_pre_hook(lambda m, args: seen.append((args[0].dtype, next(m.parameters()).dtype)))
        return model
    monkeypatch.setattr(benchmark, 'build', build)
    out = tmp_path / 'b.json'
    monkeypatch.setattr(sys, 'argv', ['benchmark.py', 'slak_t', '--sizes', '32', '--repeats', '1', '--dtype',
                                      'bfloat16', '--json', str(out)])
    benchmark.main()
    payload = json.loads(out.read_text())
    assert payload['dtype'] == 'bfloat16' and payload['complete'] and len(payload['results']) == 1
    assert seen and set(seen) == {(torch.bfloat16, torch.bfloat16)}
    proc = subprocess.run([sys.executable, 'tools/benchmark.py', '--amp', '--dtype', 'bfloat16'], capture_output=True,
                          text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), timeout=300)
    assert proc.returncode == 2 and 'not allowed with argument' in proc.stderr, proc.stderr[-2000:]
