"""Export a checkpoint to Hugging Face transformers or to nanoGPT's ckpt.pt (via interop.py), e.g.
$ python export.py --out_dir=out-shakespeare-char --format=hf --export_dir=hf-shakespeare-char"""
import json
import os
import pickle
import shutil

import checkpoint
import interop
import parallel
from cli import die, die_on

out_dir = 'out' # its ckpt.safetensors, else its ckpt.pt (nanoGPT's)
format = 'hf' # 'hf' (config.json + model.safetensors) or 'nanogpt' (a ckpt.pt, needs torch)
export_dir = '' # a new or empty directory
overwrite = False # write into a non-empty export_dir
exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())

parallel.pin_platform('cpu') # only arrays move
if format not in ('hf', 'nanogpt'):
    die(f"format={format!r}: use 'hf' (Hugging Face transformers) or 'nanogpt' (a ckpt.pt)")
if not export_dir:
    die("give --export_dir=DIR, the directory the exported files go to")
if os.path.exists(export_dir) and not (os.path.isdir(export_dir)
                                       and (overwrite or not os.listdir(export_dir))):
    die(f"export_dir {export_dir!r} is a file or not empty: choose another, or --overwrite=True")
ckpt_path = checkpoint.resume_path(out_dir)
with die_on(checkpoint.CheckpointError, ValueError): # all read and converted before writing
    if format == 'nanogpt':
        interop.require_torch("writing nanoGPT's ckpt.pt") # before a long read, not after it
    arrays, meta, config, data_dir, vocab = checkpoint.load_model(ckpt_path)
    converted = interop.to_hf(arrays, meta) if format == 'hf' else interop.to_nanogpt(arrays, meta)
if vocab is None and config.vocab_size < 50257:
    print(f"note: no vocabulary in {data_dir} to copy along: export where train.py ran")
if format == 'nanogpt' and config.activation == 'gelu_new':
    print("note: nanoGPT computes the exact GELU, not this model's tanh form: outputs differ")

files = ['config.json', 'model.safetensors'] if format == 'hf' else ['ckpt.pt']
if vocab is not None: # nanoGPT's sample.py reads meta.pkl only
    json_ok = format == 'hf' and os.path.exists(os.path.join(data_dir, 'meta.json'))
    files.append('meta.json' if json_ok else 'meta.pkl')
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
    if vocab is not None and format == 'hf':
        shutil.copyfile(os.path.join(data_dir, files[-1]), out(files[-1]))
    elif vocab is not None:
        with open(out('meta.pkl'), 'wb') as f:
            pickle.dump(vocab, f)
except OSError as e:
    die(f"cannot write to export_dir {export_dir!r} ({e.strerror or e})")
print(f"exported {ckpt_path} (iter {meta.get('iter_num', 0)}): {', '.join(map(out, files))}")
