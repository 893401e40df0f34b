"""OpenWebText with GPT-2's BPE into nanoGPT's train.bin (~9B tokens, ~17GB) / val.bin: needs
`pip install datasets` and ~54GB of cache."""
import glob
import os
import sys
import numpy as np
import tiktoken
from tqdm import tqdm

num_proc = 8  # workers for .map(): about half the CPU cores
num_proc_load_dataset = num_proc  # for load_dataset()
REPO, PARQUET = 'Skylion007/openwebtext', 'plain_text/train-*.parquet'

enc = tiktoken.get_encoding("gpt2")

def process(example):
    ids = enc.encode_ordinary(example['text'])  # special-token text in a document is just text
    ids.append(enc.eot_token)  # 50256, the separator between documents
    return {'ids': ids, 'len': len(ids)}

def write_split(batches, arr_len, filename, total=None):
    assert enc.max_token_value < 2**16, "uint16 cannot hold this vocabulary"
    arr = np.memmap(filename + '.tmp', dtype=np.uint16, mode='w+', shape=(arr_len,))
    idx = 0
    for arr_batch in tqdm(batches, total=total, desc=f'writing {filename}'):
        arr[idx: idx + len(arr_batch)] = arr_batch
        idx += len(arr_batch)
    arr.flush()
    os.replace(filename + '.tmp', filename)  # a run cut short leaves a good file as it was
    return idx

def main():
    try:
        from datasets import load_dataset  # imported here: the tests run the rest without it
    except ImportError:
        sys.exit("error: data/openwebtext/prepare.py needs Hugging Face's datasets: "
                 "pip install datasets")
    from huggingface_hub import snapshot_download

    # parquet files: current datasets no longer runs the repo's loading script
    try:
        folder = snapshot_download(REPO, repo_type='dataset', allow_patterns=PARQUET)
    except Exception as e:  # e.g. offline, a bad HF_TOKEN
        sys.exit(f"error: cannot fetch {REPO}: {type(e).__name__}: {e}".split('\n')[0])
    files = sorted(glob.glob(os.path.join(folder, PARQUET)))
    dataset = load_dataset('parquet', data_files={'train': files}, num_proc=num_proc_load_dataset)
    # only a 'train' split: hold out nanoGPT's val
    split_dataset = dataset["train"].train_test_split(test_size=0.0005, seed=2357, shuffle=True)
    split_dataset['val'] = split_dataset.pop('test')
    tokenized = split_dataset.map(process, remove_columns=['text'], desc="tokenizing the splits",
                                  num_proc=num_proc)
    for split, dset in tokenized.items():
        filename = os.path.join(os.path.dirname(os.path.abspath(__file__)), f'{split}.bin')
        total_batches = min(1024, len(dset))  # many documents per numpy copy
        batches = (np.concatenate(dset.shard(num_shards=total_batches, index=i, contiguous=True)
                                  .with_format('numpy')['ids']) for i in range(total_batches))
        n = write_split(batches, int(np.sum(dset['len'], dtype=np.uint64)), filename, total_batches)
        print(f"{split} has {n:,} tokens ({os.path.getsize(filename) / 1e9:.2f} GB in {filename})")

if __name__ == '__main__':
    main()
