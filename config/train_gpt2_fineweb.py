# GPT-2 (124M) on FineWeb10B's GPT-2 tokens, nanoGPT's train_gpt2 settings otherwise
# $ python data/fineweb10B/prepare.py 103 && python train.py config/train_gpt2_fineweb.py
exec(open('config/train_gpt2.py').read())  # a path from the repository root, as above
wandb_project = 'fineweb'
dataset = 'fineweb10B'
