"""
Move a model out of this port: to Hugging Face transformers, or back to nanoGPT.

$ python export.py --out_dir=out-shakespeare-char --format=hf --export_dir=hf-shakespeare-char
    # config.json + model.safetensors: transformers' GPT2LMHeadModel.from_pretrained('hf-shakespeare-char')
$ python export.py --out_dir=out --format=nanogpt --export_dir=nanogpt-out
    # ckpt.pt in nanoGPT's layout, for its sample.py and train.py --init_from=resume (needs torch)

The checkpoint is out_dir's: ours (ckpt.safetensors) or, where there is none, a nanoGPT ckpt.pt, so a
nanoGPT model goes to transformers too. A character-level model's vocabulary goes beside it.
The conversions are checkpoint.py's (to_hf, to_nanogpt); this script checks, converts, then writes.
"""
import json
import os
import pickle
import shutil

import checkpoint
import parallel
from parallel import die

# -----------------------------------------------------------------------------
out_dir = 'out' # the checkpoint to export: out_dir/ckpt.safetensors, else out_dir/ckpt.pt (nanoGPT's)
format = 'hf' # 'hf' (transformers' GPT2LMHeadModel: config.json + model.safetensors) or 'nanogpt' (nanoGPT's ckpt.pt)
export_dir = '' # the directory the files go to: new, or empty
overwrite = False # if True, write into a non-empty export_dir (files of the same names are replaced)
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read()) # overrides from command line or config file
# -----------------------------------------------------------------------------

parallel.pin_platform('cpu') # only arrays are moved: no accelerator needed
if format not in ('hf', 'nanogpt'):
    die(f"format={format!r}: use 'hf' (Hugging Face transformers) or 'nanogpt' (nanoGPT's ckpt.pt)")
if not export_dir:
    die("give --export_dir=DIR, the directory the exported files go to")
if os.path.exists(export_dir) and not os.path.isdir(export_dir):
    die(f"export_dir {export_dir!r} is a file: give a directory")
if os.path.isdir(export_dir) and os.listdir(export_dir) and not overwrite:
    die(f"export_dir {export_dir!r} exists and is not empty: choose another, or pass --overwrite=True to write into it")

# read and convert everything before anything is written: bad input leaves no half export behind
ckpt_path = checkpoint.resume_path(out_dir)
try:
    if format == 'nanogpt':
        checkpoint.require_torch("writing nanoGPT's ckpt.pt") # before a long read, not after it
    arrays, meta = checkpoint.load_checkpoint(ckpt_path)
    if 'model_args' not in meta:
        raise checkpoint.CheckpointError(f"{ckpt_path} has no model_args: not written by train.py")
    model_args = meta['model_args']
    if format == 'hf':
        hf_config, tensors = checkpoint.to_hf(arrays, meta)
    else:
        ckpt = checkpoint.to_nanogpt(arrays, meta)
    # a character-level model is useless without its dataset's vocabulary (sample.py's lookup)
    dataset = meta.get('config', {}).get('dataset')
    data_dir = os.path.join('data', dataset) if dataset else None
    vocab = checkpoint.load_meta(data_dir) if data_dir else None
except checkpoint.CheckpointError as e:
    die(e)
vocab_size = model_args['vocab_size']
if vocab is not None and vocab['vocab_size'] != vocab_size:
    die(f"the vocabulary in {data_dir} has {vocab['vocab_size']} tokens but the model has {vocab_size}: "
        f"the dataset was prepared again differently; export from the directory train.py ran in")
if vocab_size > 50257:
    print(f"vocab_size {vocab_size} is kept as is: GPT-2's 50257 tokens padded to a multiple of 64 for speed; "
          f"the tokenizer never produces ids 50257..{vocab_size - 1}, and their logits were never trained up")
elif vocab is None and vocab_size < 50257:
    print(f"note: no vocabulary found for this {vocab_size}-token model (looked in {data_dir}); "
          f"run export.py from the directory train.py ran in to copy it beside the export")
if format == 'nanogpt' and model_args.get('activation', 'gelu') == 'gelu_new':
    print("note: this model uses GPT-2's tanh GELU; nanoGPT's GPT computes the exact GELU (as it does for the "
          "GPT-2 weights it loads), so its outputs there will differ slightly")

try:
    os.makedirs(export_dir, exist_ok=True)
    if format == 'hf':
        from safetensors.numpy import save_file
        with open(os.path.join(export_dir, 'config.json'), 'w') as f:
            json.dump(hf_config, f, indent=2)
        save_file(tensors, os.path.join(export_dir, 'model.safetensors'), metadata={'format': 'pt'})
        written = ['config.json', 'model.safetensors']
    else:
        import torch
        torch.save(ckpt, os.path.join(export_dir, 'ckpt.pt'))
        written = ['ckpt.pt']
    if vocab is not None:
        source = os.path.join(data_dir, 'meta.json' if os.path.exists(os.path.join(data_dir, 'meta.json')) else 'meta.pkl')
        if format == 'nanogpt' and source.endswith('.json'): # nanoGPT's sample.py reads only meta.pkl
            with open(os.path.join(export_dir, 'meta.pkl'), 'wb') as f:
                pickle.dump({k: vocab[k] for k in ('vocab_size', 'itos', 'stoi') if k in vocab}, f)
            written.append('meta.pkl')
        else:
            shutil.copyfile(source, os.path.join(export_dir, os.path.basename(source)))
            written.append(os.path.basename(source))
except OSError as e:
    die(f"cannot write to export_dir {export_dir!r} ({e.strerror or e})")
print(f"exported {ckpt_path} (iter {meta.get('iter_num', 0)}) to {export_dir}: {', '.join(written)}")
if format == 'hf':
    print(f"load it with transformers.GPT2LMHeadModel.from_pretrained({export_dir!r}); "
          f"activation_function {hf_config['activation_function']!r}")
else:
    print(f"for nanoGPT: put ckpt.pt in an out_dir, then sample.py or train.py --init_from=resume"
          + (f"; its sample.py reads the vocabulary from data/{dataset}/meta.pkl" if vocab is not None else ""))
