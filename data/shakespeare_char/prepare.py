"""Tiny Shakespeare by characters into train.bin, val.bin and meta.json (JSON: safe to load)."""
import os
import json
import requests
import numpy as np

here = os.path.dirname(os.path.abspath(__file__))

# download the tiny shakespeare dataset
input_file_path = os.path.join(here, 'input.txt')
if not os.path.exists(input_file_path):
    data_url = 'https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt'
    response = requests.get(data_url, timeout=60)
    response.raise_for_status()
    with open(input_file_path, 'w', encoding='utf-8') as f:
        f.write(response.text)

with open(input_file_path, 'r', encoding='utf-8') as f:
    data = f.read()
print(f"length of dataset in characters: {len(data):,}")  # 1,115,394

chars = sorted(set(data))
vocab_size = len(chars)
print("all the unique characters:", ''.join(chars))
print(f"vocab size: {vocab_size:,}")  # 65
stoi = {ch: i for i, ch in enumerate(chars)}
itos = {i: ch for i, ch in enumerate(chars)}

n = len(data)
train_ids = np.array([stoi[c] for c in data[:int(n * 0.9)]], dtype=np.uint16)
val_ids = np.array([stoi[c] for c in data[int(n * 0.9):]], dtype=np.uint16)
print(f"train has {len(train_ids):,} tokens")  # 1,003,854
print(f"val has {len(val_ids):,} tokens")  # 111,540
train_ids.tofile(os.path.join(here, 'train.bin'))
val_ids.tofile(os.path.join(here, 'val.bin'))

# for sample.py (JSON keys are strings: load_meta turns itos's back into ints)
with open(os.path.join(here, 'meta.json'), 'w', encoding='utf-8') as f:
    json.dump(dict(vocab_size=vocab_size, itos=itos, stoi=stoi), f, ensure_ascii=False, indent=0)
print(f"wrote train.bin, val.bin and meta.json to {here}")
