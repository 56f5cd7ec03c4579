//! System calls used only by the pool layer.
