"""FineWeb10B's cached GPT-2 tokens (modded-nanogpt's shards) into nanoGPT's train.bin / val.bin:
$ python data/fineweb10B/prepare.py [N]  # the val shard, train shards 1..N (8; 103: all ~10B)"""
import os
import sys
import numpy as np
from tqdm import tqdm
from huggingface_hub import hf_hub_download

REPO = 'kjj0/fineweb10B-gpt2'
HEADER = 256  # int32s before the tokens: magic, version, token count, zeros

def fetch(name):
    """A shard's path in the Hugging Face cache and its token count, its header checked."""
    try:
        path = hf_hub_download(REPO, name, repo_type='dataset')
    except Exception as e:  # e.g. offline, a bad HF_TOKEN
        sys.exit(f"error: cannot fetch {name} from {REPO}: {type(e).__name__}: {e}".split('\n')[0])
    header = np.fromfile(path, dtype=np.int32, count=HEADER)
    size, n = os.path.getsize(path), int(header[2]) if len(header) == HEADER else -1
    if n < 0 or list(header[:2]) != [20240520, 1] or size != 4 * HEADER + 2 * n:  # magic, version
        sys.exit(f"error: {path} is not a whole fineweb shard ({size:,} bytes, header "
                 f"{header[:3].tolist()}): delete it and run again")
    return path, n

def write(split, shards):
    filename = os.path.join(os.path.dirname(os.path.abspath(__file__)), f'{split}.bin')
    n = sum(n for _, n in shards)
    if os.path.exists(filename) and os.path.getsize(filename) == 2 * n:
        return print(f"{filename} already holds its {n:,} tokens")
    with open(filename + '.tmp', 'wb') as f:  # a run cut short leaves train.bin as it was
        for path, _ in tqdm(shards, desc=f'writing {filename}'):
            np.fromfile(path, dtype=np.uint16, offset=4 * HEADER).tofile(f)  # one shard in memory
    os.replace(filename + '.tmp', filename)
    print(f"{split} has {n:,} tokens ({2 * n / 1e9:.2f} GB in {filename})")

if __name__ == '__main__':
    n = ' '.join(sys.argv[1:]) or '8'
    if not n.isdigit() or not 1 <= int(n) <= 103:
        sys.exit(f"error: give the number of train shards, 1 to 103, not {n!r}")
    val = [fetch('fineweb_val_000000.bin')]  # every shard's header checked before any writing
    train = [fetch(f'fineweb_train_{i:06d}.bin') for i in range(1, int(n) + 1)]
    write('val', val)
    write('train', train)
