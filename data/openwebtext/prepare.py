"""
OpenWebText (~8M documents) with GPT-2's BPE into train.bin / val.bin of uint16 ids, as nanoGPT's.
Needs Hugging Face `datasets` (pip install datasets) and ~54GB of cache; write_documents does not.
"""
import os
import numpy as np
import tiktoken
from tqdm import tqdm

# workers for .map(); about half the number of CPU cores is a good start
num_proc = 8

# workers for load_dataset(); the best value also depends on network speed, but more than 1 helps
num_proc_load_dataset = num_proc

enc = tiktoken.get_encoding("gpt2")


def process(example):
    """One document -> its token ids, then the end-of-text token (50256), and their count."""
    ids = enc.encode_ordinary(example['text'])  # special-token text in a document is just text
    ids.append(enc.eot_token)  # the separator between documents in the concatenated stream
    return {'ids': ids, 'len': len(ids)}


def write_split(batches, arr_len, filename, total=None, desc=None):
    """Write batches (1-D arrays of token ids, arr_len in all) in order into one uint16 memmap."""
    assert enc.max_token_value < 2**16, "uint16 cannot hold this vocabulary"
    arr = np.memmap(filename, dtype=np.uint16, mode='w+', shape=(arr_len,))
    idx = 0
    for arr_batch in tqdm(batches, total=total, desc=desc or f'writing {filename}'):
        if idx + len(arr_batch) > arr_len:
            raise ValueError(f"{filename}: documents hold more than the {arr_len:,} tokens counted")
        arr[idx: idx + len(arr_batch)] = arr_batch
        idx += len(arr_batch)
    if idx != arr_len:
        raise ValueError(f"{filename}: wrote {idx:,} tokens, expected {arr_len:,}")
    arr.flush()
    del arr
    return idx


def write_documents(documents, filename, docs_per_batch=1024):
    """Tokenize documents ({'text': str} each, e.g. a small corpus in memory) and write them in
    order, as main() does a Hugging Face split; returns the number of tokens written."""
    processed = [process(doc) for doc in documents]
    arr_len = sum(p['len'] for p in processed)
    batches = (np.concatenate([p['ids'] for p in processed[i:i + docs_per_batch]]).astype(np.uint16)
               for i in range(0, len(processed), docs_per_batch))
    return write_split(batches, arr_len, filename, total=-(-len(processed) // docs_per_batch))


def main():
    from datasets import load_dataset  # Hugging Face datasets: only this script needs it

    dataset = load_dataset("openwebtext", num_proc=num_proc_load_dataset)

    # openwebtext ships a single 'train' split: hold out a small val split (nanoGPT's seed and size)
    split_dataset = dataset["train"].train_test_split(test_size=0.0005, seed=2357, shuffle=True)
    split_dataset['val'] = split_dataset.pop('test')
    # train: 8,009,762 documents, val: 4,007

    tokenized = split_dataset.map(
        process,
        remove_columns=['text'],
        desc="tokenizing the splits",
        num_proc=num_proc,
    )

    here = os.path.dirname(os.path.abspath(__file__))
    for split, dset in tokenized.items():
        arr_len = int(np.sum(dset['len'], dtype=np.uint64))
        filename = os.path.join(here, f'{split}.bin')
        # write in contiguous shards: many documents per numpy copy instead of one at a time
        total_batches = min(1024, len(dset))
        batches = (np.concatenate(dset.shard(num_shards=total_batches, index=i, contiguous=True)
                                  .with_format('numpy')['ids'])
                   for i in range(total_batches))
        n = write_split(batches, arr_len, filename, total=total_batches)
        print(f"{split} has {n:,} tokens ({os.path.getsize(filename) / 1e9:.2f} GB in {filename})")

    # train.bin is ~17GB, val.bin ~8.5MB
    # train has ~9B tokens (9,035,582,198)
    # val has ~4M tokens (4,434,897)

    # to read them back: np.memmap('train.bin', dtype=np.uint16, mode='r')


if __name__ == '__main__':
    main()
