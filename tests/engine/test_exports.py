"""``engine.train`` exports what it defines; the names of other modules are imported from those."""
import importlib
import inspect

# by its module path: ``edaformer.engine.train`` as an attribute is the function
train_module = importlib.import_module("edaformer.engine.train")


def test_train_module_exports_only_its_own_names():
    module = train_module.__name__
    assert module == "edaformer.engine.train"
    for name in train_module.__all__:
        obj = getattr(train_module, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert obj.__module__ == module, name
        else:  # a constant: assigned in the module itself
            assert f"\n{name} = " in inspect.getsource(train_module), name
    assert set(train_module.__all__) >= {"train", "train_one_iteration", "validate", "NonFiniteLossError"}
