"""Keeps TORCH_TO_JAX_MAPPING.md honest: every `file.py:symbol` it cites must exist in that file,
and every torch construct of nanoGPT that the map promises to cover must be named in it."""
import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, 'TORCH_TO_JAX_MAPPING.md')
REF = re.compile(r'\b((?:[\w-]+/)*[\w-]+\.py):([A-Za-z_][\w]*(?:\.[A-Za-z_]\w*)*)')

# the torch constructs nanoGPT uses; each must appear verbatim somewhere in the map
REQUIRED = [
    'nn.Module', 'nn.Linear', 'nn.Embedding', 'nn.LayerNorm', 'F.layer_norm', 'nn.Dropout', 'nn.GELU',
    'F.scaled_dot_product_attention', 'register_buffer', 'weight tying', 'torch.nn.init.normal_',
    'torch.nn.init.zeros_', 'named_parameters', 'F.cross_entropy', 'F.softmax', 'torch.topk',
    'torch.multinomial', 'torch.no_grad', 'model.train()', 'model.eval()', 'torch.optim.AdamW',
    'param_groups', 'clip_grad_norm_', 'GradScaler', 'torch.amp.autocast', 'allow_tf32', 'torch.compile',
    'DDP', 'init_process_group', 'destroy_process_group', 'no_sync', 'torchrun', 'torch.manual_seed',
    'torch.randint', 'pin_memory', 'non_blocking', 'torch.from_numpy', 'torch.save', 'torch.load',
    'torch.cuda.synchronize', 'torch.profiler', 'torch.cuda.is_bf16_supported', 'state_dict',
    'load_state_dict', '_orig_mod.', 'GPT2LMHeadModel.from_pretrained',
    # as nanoGPT's code names them
    'DistributedDataParallel', 'require_backward_grad_sync', 'torch.cuda.set_device', 'torch.backends.cudnn.allow_tf32',
    'torch.cuda.amp.GradScaler', 'inspect.signature(torch.optim.AdamW)',
]


def defined_names(path):
    """Top-level functions, classes and assigned globals of a file, plus Class.member names."""
    tree = ast.parse(open(path).read(), filename=path)
    names = set()

    def targets(node):
        for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
            for n in ast.walk(t):
                if isinstance(n, ast.Name):
                    yield n.id

    for node in ast.walk(tree):  # scripts define globals inside if/with/try blocks too
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            names.update(targets(node))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split('.')[0] for a in node.names)
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    names.add(f'{node.name}.{item.name}')
                elif isinstance(item, (ast.Assign, ast.AnnAssign)):
                    names.update(f'{node.name}.{n}' for n in targets(item))
    return names


def test_every_reference_exists():
    text = open(DOC).read()
    refs = sorted(set(REF.findall(text)))
    assert len(refs) >= 40, f"the map cites only {len(refs)} file.py:symbol references"
    cache, missing = {}, []
    for file, symbol in refs:
        path = os.path.join(ROOT, file)
        if not os.path.exists(path):
            missing.append(f'{file}:{symbol} (no such file)')
            continue
        if file not in cache:
            cache[file] = defined_names(path)
        if symbol not in cache[file]:
            missing.append(f'{file}:{symbol}')
    assert not missing, 'stale references in TORCH_TO_JAX_MAPPING.md: ' + ', '.join(missing)


def test_every_construct_is_mapped():
    text = open(DOC).read()
    absent = [c for c in REQUIRED if c not in text]
    assert not absent, 'TORCH_TO_JAX_MAPPING.md does not cover: ' + ', '.join(absent)


def test_reference_checker_catches_a_stale_name(tmp_path):
    # the checker itself must be able to fail: a renamed symbol is not found
    f = tmp_path / 'x.py'
    f.write_text('class A:\n    def m(self): pass\nb = 1\nif True:\n    c = 2\n')
    names = defined_names(str(f))
    assert {'A', 'A.m', 'b', 'c'} <= names and 'A.n' not in names and 'd' not in names
