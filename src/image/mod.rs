//! Images: format inspection (pure, safe on hostile input) and, next, conversion.

pub mod inspect;
