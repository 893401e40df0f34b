"""Tiny Shakespeare with GPT-2's BPE into nanoGPT's train.bin / val.bin (no meta: the default)."""
import os
import sys
import requests
import tiktoken
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
n = len(data)
enc = tiktoken.get_encoding("gpt2")
for split, text in (('train', data[:int(n * 0.9)]), ('val', data[int(n * 0.9):])):
    ids = np.array(enc.encode_ordinary(text), dtype=np.uint16)
    print(f"{split} has {len(ids):,} tokens")  # train 301,966, val 36,059
    ids.tofile(os.path.join(here, f'{split}.bin'))
