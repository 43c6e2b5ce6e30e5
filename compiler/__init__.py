"""lowbit compiler: ``compiler.compile(model, target=...) -> Artifact``.

Imports are lazy (CLI start-up time) so that ``lowbit --help`` and the CLI's environment set-up run
before TVM, numpy and onnxruntime load.
"""


def __getattr__(name):
    if name == "compile":
        from compiler.driver import compile

        return compile
    if name == "CompileOptions":
        from compiler.options import CompileOptions

        return CompileOptions
    if name == "UserError":
        from runtime.errors import UserError

        return UserError
    raise AttributeError(name)
