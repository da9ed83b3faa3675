"""The BeTrace DSL v2: ``when { ... } always { ... } never { ... }``."""
