"""Patch the mmcv 2.1.0 sdist so it builds against torch >= 2.10 headers (C++20 required).

mmcv 2.1.0's setup.py hard-codes ``-std=c++17``; torch only adds ``-std=c++20`` when no ``-std`` flag is present,
so every translation unit fails with "C++20 or later compatible compiler is required to use ATen".
This replaces the flag (three occurrences) and repacks the tarball. Usage: patch_mmcv.py SRC.tar.gz OUTDIR
"""
import os
import sys
import tarfile
import tempfile


def main(src: str, outdir: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(src) as tf:
            tf.extractall(tmp, filter='data')
        root = os.path.join(tmp, 'mmcv-2.1.0')
        setup_py = os.path.join(root, 'setup.py')
        text = open(setup_py).read()
        n = text.count('-std=c++17')
        if n != 3:
            sys.exit(f'patch_mmcv: expected 3 "-std=c++17" flags in {setup_py}, found {n}; not mmcv 2.1.0?')
        open(setup_py, 'w').write(text.replace('-std=c++17', '-std=c++20'))
        os.makedirs(outdir, exist_ok=True)
        with tarfile.open(os.path.join(outdir, 'mmcv-2.1.0.tar.gz'), 'w:gz') as tf:
            tf.add(root, arcname='mmcv-2.1.0')


if __name__ == '__main__':
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
