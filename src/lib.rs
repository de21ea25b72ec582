//! esserver
