"""HellaSwag's zero-shot accuracy of a model, scored as build-nanogpt does (GPT-2: acc_norm 0.2955)
$ python hellaswag.py --init_from=gpt2 --max_examples=1000    # or --hellaswag_file=local.jsonl"""
import json
import os

import numpy as np
import jax
from tqdm import tqdm

from model import gpt_forward, cross_entropy
import checkpoint
import interop
import parallel
import training
from cli import die_on, on_interrupt

URL = 'https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl'
VAL_FILE = os.path.join('data', 'hellaswag', 'hellaswag_val.jsonl')  # as train.py's data: from cwd
BUCKET = 32  # rows padded to a multiple of 32 tokens: a few shapes to compile

def download():
    import requests
    os.makedirs(os.path.dirname(VAL_FILE), exist_ok=True)
    try:  # a body short of its Content-Length raises too
        r = requests.get(URL, timeout=30)
        r.raise_for_status()
    except requests.RequestException as e:
        raise OSError(f"cannot download {URL} ({type(e).__name__}): put it at {VAL_FILE}")
    with open(VAL_FILE + '.tmp', 'wb') as f:  # never half a file
        f.write(r.content)
    os.replace(VAL_FILE + '.tmp', VAL_FILE)

def check_vocab(config):  # GPT-2's 50257 tokens, or train.py's padded 50304
    if not 50257 <= config.vocab_size <= 50304:
        raise ValueError(f"HellaSwag needs GPT-2's tokens, the model has {config.vocab_size}")

def load_examples(path='', max_examples=0, config=None):
    """The first max_examples (0: all) of a jsonl ('': the val set) as (ctx, endings, label)."""
    import tiktoken
    if max_examples < 0:
        raise ValueError(f"the number of examples must be >= 0 (0: all), got {max_examples}")
    if config is not None:
        check_vocab(config)
    enc, path, examples = tiktoken.get_encoding('gpt2'), path or VAL_FILE, []
    if path == VAL_FILE and not os.path.exists(path):
        download()
    try:
        lines = open(path, encoding='utf-8').read().splitlines()[:max_examples or None]
    except (OSError, UnicodeDecodeError) as e:
        raise OSError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    for i, line in enumerate(lines, 1):
        try:
            ex = json.loads(line)
            ends = [enc.encode_ordinary(' ' + end) for end in ex['endings']]
            if type(ex['endings']) is not list or len(ends) != 4 or ex['label'] not in range(4):
                raise ValueError
            examples.append((enc.encode_ordinary(ex['ctx']), ends, int(ex['label'])))
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}, line {i}: not HellaSwag's ctx, 4 endings, label") from None
    if not examples:
        raise ValueError(f"{path} holds no examples")
    return examples

_scorers = {}  # one jitted scorer per model: each bucket compiles once a process

def ending_losses(params, config, examples, batch_rows=128):
    """Each ending's loss on its own tokens, summed and per token: two (examples, 4) arrays."""
    check_vocab(config)
    L = config.block_size + 1  # a longer row keeps its last L tokens, as generate crops
    rows = [(ctx + end)[-L:] for ctx, ends, _ in examples for end in ends]
    n_N4 = np.array([[min(len(end), L - 1) for end in ends] for _, ends, _ in examples])
    order, R = sorted(range(len(rows)), key=lambda i: len(rows[i])), min(batch_rows, len(rows))
    chunks, outs = [order[i:i + R] for i in range(0, len(rows), R)], []
    forward, loss = gpt_forward(config), lambda l_TV, y_T: cross_entropy(l_TV[None], y_T[None])
    score = _scorers.setdefault(repr(config), jax.jit(lambda params, x_BT, y_BT: jax.vmap(loss)(
        forward.apply(params, None, x_BT, y_BT)[0], y_BT)))  # each row's mean loss
    for chunk in tqdm(chunks, 'hellaswag', delay=2, leave=False):
        T = min(-(-(len(rows[chunk[-1]]) - 1) // BUCKET) * BUCKET, config.block_size)
        x_BT, y_BT = np.zeros((R, T), np.int32), np.full((R, T), -1, np.int32)
        for b, i in enumerate(chunk):  # the targets: the ending's tokens only
            tokens, n = rows[i], n_N4.flat[i]
            x_BT[b, :len(tokens) - 1] = tokens[:-1]
            y_BT[b, len(tokens) - 1 - n:len(tokens) - 1] = tokens[-n:]
        outs.append(score(params, x_BT, y_BT))
        jax.block_until_ready(outs[-2:-1])  # one call queued: the bar stays true
    mean = np.empty(len(rows))
    for chunk, loss_B in zip(chunks, outs):
        mean[chunk] = np.asarray(loss_B)[:len(chunk)]
    return mean.reshape(-1, 4) * n_N4, mean.reshape(-1, 4)

def evaluate(params, config, examples, batch_rows=128):
    """(n, acc, acc_norm): how often the lowest summed loss, and per token, is the label's."""
    label_N = np.array([label for *_, label in examples])
    right = [np.mean(loss_N4.argmin(1) == label_N)
             for loss_N4 in ending_losses(params, config, examples, batch_rows)]
    return len(examples), *map(float, right)

if __name__ == '__main__':  # train.py imports the functions above
    init_from = 'resume' # 'resume' (from out_dir), a gpt2 variant, HF dir, ckpt.pt
    out_dir = 'out' # ignored if init_from is not 'resume'
    hellaswag_file = '' # a jsonl in HellaSwag's format; '': its val set, downloaded once
    max_examples = 0 # 0: all
    batch_rows = 128 # endings scored in one compiled call
    device = 'cuda' # or 'cpu', 'cuda:1', etc.
    dtype = 'auto' # 'float32', 'bfloat16', 'float16'; 'auto': bfloat16 on GPU/TPU, else float32
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
    on_interrupt(lambda: "interrupted")
    parallel.pin_platform(device)
    dev = parallel.select_devices(device)[0]
    training.set_precision(parallel.select_dtype(dtype, dev.platform))  # as train.py's eval
    with die_on(checkpoint.CheckpointError, ValueError, OSError):
        examples = load_examples(hellaswag_file, max_examples)  # a bad file fails first
        gptconf, params, _, _ = interop.load_weights(init_from, out_dir)
        check_vocab(gptconf)
    n, acc, acc_norm = evaluate(jax.device_put(params, dev), gptconf, examples, batch_rows)
    print(f"hellaswag: {n} examples, acc {acc:.4f}, acc_norm {acc_norm:.4f}")
