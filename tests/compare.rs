//! The comparison helpers of tests/common themselves: a NaN or inf on either side, or a length
//! mismatch, fails every one of them, and a failure names the tensor and the worst index.
mod common;
use common::*;

fn panics(f: impl FnOnce() + std::panic::UnwindSafe) -> String {
    let e = std::panic::catch_unwind(f).expect_err("should have failed");
    e.downcast_ref::<String>().cloned().or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string())).unwrap()
}

#[test]
fn all_close_fails_on_non_finite_values_and_lengths_and_names_the_worst_element() {
    let want = [1.0, -2.0, 3.0];
    assert_eq!(all_close("t", &[1.0, -2.0, 3.0], &want, Tol::abs(0.0)), Ok(()));
    for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        let e = all_close("t", &[1.0, bad, 3.0], &want, Tol::abs(1e9)).unwrap_err();
        assert!(e.contains("t[1]") && e.contains("non-finite"), "{e}");
        let e = all_close("t", &want, &[1.0, -2.0, bad], Tol::abs(1e9)).unwrap_err();
        assert!(e.contains("t[2]") && e.contains("non-finite"), "{e}");
        assert!(max_abs_diff("t", &[1.0, bad, 3.0], &want).is_err());
        assert!(max_rel_diff("t", &want, &[bad, -2.0, 3.0]).is_err());
    }
    let e = all_close("t", &[1.0, -2.0], &want, Tol::abs(1e9)).unwrap_err();
    assert!(e.contains("2 values computed, 3 golden"), "{e}");
    assert!(max_abs_diff("t", &[1.0, -2.0, 3.0, 4.0], &want).is_err());
    // abs + rel·|want|: index 2 is off by 0.3 against a bound of 0.1 + 0.01·3; index 0 passes.
    let got = [1.05, -2.0, 3.3];
    let e = all_close("w", &got, &want, Tol { abs: 0.1, rel: 0.01 }).unwrap_err();
    assert!(e.starts_with("w: 1 of 3 elements") && e.contains("worst [2]: got 3.3, want 3"), "{e}");
    assert_eq!(all_close("t", &got, &want, Tol { abs: 0.1, rel: 0.1 }), Ok(()));
    assert!(all_close("t", &got, &want, Tol::abs(f64::NAN)).is_err(), "a NaN bound passes nothing");
    assert!((max_abs_diff("t", &got, &want).unwrap() - 0.3).abs() < 1e-12);
    assert!((max_rel_diff("t", &got, &want).unwrap() - 0.1).abs() < 1e-12);
}

#[test]
fn the_scalar_and_norm_helpers_fail_on_non_finite_values() {
    for bad in [f64::NAN, f64::INFINITY] {
        for (got, want) in [(bad, 1.0), (1.0, bad)] {
            assert!(panics(move || assert_close("c", &[got], &[want], 1e9)).contains("non-finite"));
            assert!(panics(move || assert_rel("r", got, want, 1e9)).contains("non-finite"));
            assert!(panics(move || assert_fixture_close("f", got, want, 1e9)).contains("non-finite"));
            assert!(norm_close(&[got, 0.0], &[want, 0.0], 1e9).unwrap_err().contains("non-finite"));
        }
    }
    assert!(panics(|| assert_close("c", &[1.0], &[1.0, 2.0], 1e9)).contains("1 values computed, 2 golden"));
    assert!(norm_close(&[1.0], &[1.0, 2.0], 1e9).is_err());
    assert_rel("r", 1.0 + 1e-6, 1.0, 1e-5);
    assert_fixture_close("f", 1e-6, 0.0, 1e-5);
    assert_eq!(norm_close(&[1.0, 1e-5], &[1.0, 0.0], 1e-4), Ok(()));
}

#[test]
fn the_reference_cache_line_is_parsed_not_substring_matched() {
    assert_eq!(ref_cache_counts("x\nreference cache: 3 pairs reused, 12 computed\ny"), (3, 12));
    assert_eq!(ref_cache_counts("reference cache: 0 pairs reused, 112 computed"), (0, 112));
    assert!(
        panics(|| {
            ref_cache_counts("no such line");
        })
        .contains("want one reference cache line")
    );
}
