# the fastest recipe found to the README CPU run's val loss (1.909); run after train_shakespeare_char.py
n_layer, n_head, n_embd, dropout, batch_size = 4, 4, 128, 0.0, 12  # the README's CPU model and batch
rope, activation, norm, qk_norm = True, 'relu2', 'rmsnorm', True
optimizer, muon_lr = 'muon', 0.02  # for the blocks' matrices; AdamW at learning_rate for the rest
max_iters = lr_decay_iters = 350  # instead of 2000
warmup_iters, learning_rate, min_lr = 40, 2e-3, 2e-4
eval_interval = log_interval = 350  # evals and printed lines cost time: the first and last only
