//! System calls used only by the daemon layer.
