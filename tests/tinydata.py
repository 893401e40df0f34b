"""The small character-level datasets the script tests train on, written the way
data/shakespeare_char/prepare.py writes its own (uint16 .bin files, 90/10 split, meta.json)."""
import json
import os

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAKESPEARE = os.path.join(REPO, '..', 'shared', 'data', 'tinyshakespeare', 'input.txt')


def tiny_text(n):
    """The first n characters of tiny Shakespeare, or n seeded random characters where the shared
    copy is absent (the tests compare runs with each other, not with fixed numbers)."""
    if os.path.exists(SHAKESPEARE):
        with open(SHAKESPEARE, encoding='utf-8') as f:
            return f.read()[:n]
    rng = np.random.default_rng(0)
    return ''.join(rng.choice(list('abcdefghij klmnop\n'), n))


def write_char_dataset(folder, text):
    """train.bin, val.bin and meta.json of text in folder (created); returns the folder as a str."""
    os.makedirs(folder, exist_ok=True)
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = np.array([stoi[c] for c in text], dtype=np.uint16)
    n = int(len(ids) * 0.9)
    ids[:n].tofile(os.path.join(folder, 'train.bin'))
    ids[n:].tofile(os.path.join(folder, 'val.bin'))
    with open(os.path.join(folder, 'meta.json'), 'w') as f:
        json.dump({'vocab_size': len(chars), 'stoi': stoi, 'itos': {i: c for c, i in stoi.items()}}, f)
    return str(folder)
