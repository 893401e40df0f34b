"""Tiny Shakespeare by characters into train.bin, val.bin and meta.json (JSON: safe to load)."""
import os
import sys
import json
import requests
import numpy as np

here = os.path.dirname(os.path.abspath(__file__))

# download the tiny shakespeare dataset
input_file_path = os.path.join(here, 'input.txt')
if not os.path.exists(input_file_path):
    data_url = 'https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt'
    try:
        response = requests.get(data_url, timeout=60)
        response.raise_for_status()
    except requests.RequestException as e:  # offline: one line, and no input.txt written
        sys.exit(f"error: cannot download {data_url} ({type(e).__name__}): put it at {input_file_path}")
    with open(input_file_path, 'w', encoding='utf-8') as f:
        f.write(response.text)

with open(input_file_path, 'r', encoding='utf-8') as f:
    data = f.read()
print(f"length of dataset in characters: {len(data):,}")  # 1,115,394

chars = sorted(set(data))
print("all the unique characters:", ''.join(chars))
print(f"vocab size: {len(chars):,}")  # 65
stoi = {ch: i for i, ch in enumerate(chars)}
itos = {i: ch for i, ch in enumerate(chars)}

n = len(data)
for split, text in (('train', data[:int(n * 0.9)]), ('val', data[int(n * 0.9):])):
    ids = np.array([stoi[c] for c in text], dtype=np.uint16)
    print(f"{split} has {len(ids):,} tokens")  # train 1,003,854, val 111,540
    ids.tofile(os.path.join(here, f'{split}.bin'))

# for sample.py; load_meta turns itos's string keys back into ints
with open(os.path.join(here, 'meta.json'), 'w', encoding='utf-8') as f:
    json.dump(dict(vocab_size=len(chars), itos=itos, stoi=stoi), f, ensure_ascii=False, indent=0)
