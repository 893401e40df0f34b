"""
Export a checkpoint to Hugging Face transformers or back to nanoGPT (conversions: interop.py), e.g.
$ python export.py --out_dir=out-shakespeare-char --format=hf --export_dir=hf-shakespeare-char
$ python export.py --out_dir=out --format=nanogpt --export_dir=nanogpt-out  # needs torch
"""
import json
import os
import pickle
import shutil

import checkpoint
import interop
import parallel
import training
from cli import die

# -----------------------------------------------------------------------------
out_dir = 'out' # the checkpoint: out_dir/ckpt.safetensors, else out_dir/ckpt.pt (nanoGPT's)
format = 'hf' # 'hf' (config.json + model.safetensors for transformers) or 'nanogpt' (a ckpt.pt)
export_dir = '' # where the files go: a new or empty directory
overwrite = False # if True, write into a non-empty export_dir, replacing files of the same names
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read()) # overrides from command line or config file
# -----------------------------------------------------------------------------

parallel.pin_platform('cpu') # only arrays move: no accelerator needed
if format not in ('hf', 'nanogpt'):
    die(f"format={format!r}: use 'hf' (Hugging Face transformers) or 'nanogpt' (a ckpt.pt)")
if not export_dir:
    die("give --export_dir=DIR, the directory the exported files go to")
if os.path.exists(export_dir) and not os.path.isdir(export_dir):
    die(f"export_dir {export_dir!r} is a file: give a directory")
if os.path.isdir(export_dir) and os.listdir(export_dir) and not overwrite:
    die(f"export_dir {export_dir!r} exists and is not empty: choose another, "
        f"or pass --overwrite=True to write into it")
ckpt_path = checkpoint.resume_path(out_dir)
try: # all read and converted before anything is written
    if format == 'nanogpt':
        interop.require_torch("writing nanoGPT's ckpt.pt") # before a long read, not after it
    arrays, meta = checkpoint.load_checkpoint(ckpt_path)
    config = checkpoint.model_config(meta.get('model_args'), ckpt_path)
    converted = interop.to_hf(arrays, meta) if format == 'hf' else interop.to_nanogpt(arrays, meta)
    dataset = meta.get('config', {}).get('dataset') # where sample.py finds a character vocabulary
    data_dir = os.path.join('data', dataset) if dataset else None
    vocab = training.load_meta(data_dir) if data_dir else None
except (checkpoint.CheckpointError, ValueError) as e:
    die(e)
if vocab is not None and vocab['vocab_size'] != config.vocab_size:
    die(f"the vocabulary in {data_dir} has {vocab['vocab_size']} tokens but the model has "
        f"{config.vocab_size}: the dataset was prepared again since; export where train.py ran")
if vocab is None and config.vocab_size < 50257:
    print(f"note: no vocabulary for this {config.vocab_size}-token model in {data_dir}: "
          f"export from the directory train.py ran in to copy it along")
if format == 'nanogpt' and config.activation == 'gelu_new':
    print("note: nanoGPT computes the exact GELU, not this model's tanh form: outputs differ")

written = ['config.json', 'model.safetensors'] if format == 'hf' else ['ckpt.pt']
if vocab is not None: # nanoGPT's sample.py reads meta.pkl only
    has_json = format == 'hf' and os.path.exists(os.path.join(data_dir, 'meta.json'))
    written.append('meta.json' if has_json else 'meta.pkl')
out = lambda name: os.path.join(export_dir, name)
try:
    os.makedirs(export_dir, exist_ok=True)
    if format == 'hf':
        from safetensors.numpy import save_file
        with open(out('config.json'), 'w') as f:
            json.dump(converted[0], f, indent=2)
        save_file(converted[1], out('model.safetensors'), metadata={'format': 'pt'})
    else:
        import torch
        torch.save(converted, out('ckpt.pt'))
    if vocab is not None and format == 'nanogpt':
        with open(out('meta.pkl'), 'wb') as f:
            pickle.dump(vocab, f)
    elif vocab is not None:
        shutil.copyfile(os.path.join(data_dir, written[-1]), out(written[-1]))
except OSError as e:
    die(f"cannot write to export_dir {export_dir!r} ({e.strerror or e})")
print(f"exported {ckpt_path} (iter {meta.get('iter_num', 0)}): {', '.join(map(out, written))}")
print(f"load it with transformers.GPT2LMHeadModel.from_pretrained({export_dir!r})" if format == 'hf'
      else "for nanoGPT: put ckpt.pt in an out_dir, then sample.py or train.py --init_from=resume"
      + (f"; its sample.py reads the vocabulary from data/{dataset}/meta.pkl" if vocab else ""))
