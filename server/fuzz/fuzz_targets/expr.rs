#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    portrait_fuzz::run(data);
});
