#![no_main]

#[path = "../src/entries.rs"]
mod entries;

libfuzzer_sys::fuzz_target!(|data: &[u8]| entries::model_config(data));
