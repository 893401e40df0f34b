# a fast recipe to the README CPU run's val loss (1.909); run after train_shakespeare_char.py
n_layer, n_head, n_embd, dropout = 4, 4, 128, 0.0  # the README's CPU model
rope, activation, norm = True, 'relu2', 'rmsnorm'
optimizer, muon_lr = 'muon', 0.02  # Muon's update costs the same per iteration at any batch size:
batch_size = 48  # few large batches spread it (and each call's fixed cost) over more tokens
max_iters = lr_decay_iters = 200
warmup_iters, learning_rate, min_lr = 20, 2e-3, 2e-4  # AdamW's part: embeddings, head, norms
eval_interval = log_interval = 200  # evals and printed lines cost time: the first and last only
