"""lvz: LoongArch KVM's phyid map and interrupt routing, as a service.

The import root only: the real code lives in ``lvz.protocol`` (wire format, sans-I/O),
``lvz.daemon`` (the trio service and the VM model), ``lvz.plugins`` (irqchips) and
``lvz.clients`` (client library and the ``lvz`` command).
"""

__version__ = "0.1.0"
