//! System calls used only by the supervisor layer.
