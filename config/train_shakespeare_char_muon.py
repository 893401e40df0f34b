# the baby GPT trained with Muon (BENCHMARKS.md compares the two)
import os
exec(open(os.path.join(os.path.dirname(__file__), 'config', 'train_shakespeare_char.py')).read())

out_dir = 'out-shakespeare-char-muon'
wandb_run_name = 'mini-gpt-muon'
optimizer = 'muon'  # the blocks' 2-D weights at muon_lr, the rest AdamW at learning_rate
muon_lr = 0.02
