//! Inputs the fuzz targets (fuzz/, run by scripts/fuzz.sh) once crashed on, kept so the
//! fix stays. Each test feeds the input the way its target does.

use vmferry_proto::{Cookie, Request, RequestBody, MAX_MULTIFD};

/// A peer's cookie asking for u32::MAX multifd channels. `streams()` overflowed (a panic
/// with overflow checks, a wrap to 0 without); the controller sizes its connect wait by
/// it before anything checks the cookie. Found by the `cookie` target.
const HUGE_MULTIFD_COOKIE: &str =
    r#"{"migration":"0123abcd","options":{"multifd":4294967295},"source_running":false}"#;

#[test]
fn a_cookie_with_u32_max_multifd_channels_counts_its_streams_without_overflowing() {
    let c: Cookie = serde_json::from_str(HUGE_MULTIFD_COOKIE).expect("decodes");
    assert_eq!(c.streams(), u32::MAX);
    let e = c.check().expect_err("refused").to_string();
    assert!(e.contains(&MAX_MULTIFD.to_string()), "{e}");
}

#[test]
fn a_perform_request_carrying_that_cookie_is_refused_by_check_not_by_a_panic() {
    let text = format!(r#"{{"id":1,"op":"perform","cookie":{HUGE_MULTIFD_COOKIE}}}"#);
    let r: Request = serde_json::from_str(&text).expect("decodes");
    let RequestBody::Perform { cookie } = r.body else {
        panic!("not a perform request: {:?}", r.body);
    };
    assert_eq!(cookie.streams(), u32::MAX);
    assert!(cookie.check().is_err());
}
