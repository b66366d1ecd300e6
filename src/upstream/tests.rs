//! Balancing and retry-budget unit tests (the pools against real servers are in tests/upstream_pools.rs).

use super::balance::{schedule, stable_hash, Balance, HashKey};
use super::retry::{Budget, Failure, RetryPolicy, MIN_RETRIES_PER_WINDOW};

#[test]
fn the_schedule_gives_each_target_its_weight_spread_out() {
    let s = schedule(&[1, 1, 2]);
    assert_eq!(s.len(), 4);
    assert_eq!(s.iter().filter(|&&i| i == 2).count(), 2);
    // Smooth: the heavy target's two turns are not adjacent.
    assert!(s.windows(2).all(|w| !(w[0] == 2 && w[1] == 2)), "{s:?}");
    assert_eq!(schedule(&[2, 4]), schedule(&[1, 2]));
    assert_eq!(schedule(&[5]).len(), 1);
}

#[test]
fn balance_rules_parse_and_print_back() {
    for s in ["round_robin", "least_request", "hash:ip", "hash:header:x-tenant", "hash:claim:sub", "hash:claim:org.id"] {
        assert_eq!(Balance::parse(s).unwrap().to_string(), s);
    }
    assert_eq!(Balance::parse("hash:header:X-Tenant").unwrap(), Balance::Hash(HashKey::Header("x-tenant".parse().unwrap())));
    for bad in ["random", "hash", "hash:header:", "hash:header:bad name", "hash:claim:", "hash:claim:a..b", "hash:cookie:x"] {
        assert!(Balance::parse(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn the_stable_hash_does_not_change_between_builds() {
    // Replicas and restarts must agree on where a key goes: pinned values, not just self-consistency.
    assert_eq!(stable_hash(b"alice"), 0xc5d1556d66774a5c);
    assert_ne!(stable_hash(b"alice"), stable_hash(b"bob"));
}

#[test]
fn retries_follow_the_named_failures_and_only_for_requests_safe_to_repeat() {
    let mut p = RetryPolicy { attempts: 2, on_connect: false, on_reset: false, on_timeout: false, on_status: vec![], budget_percent: 20 };
    for on in ["connect", "reset", "503"] {
        p.add_on(on).unwrap();
    }
    assert!(p.add_on("404").is_err() && p.add_on("sometimes").is_err());
    let (get, post) = (http::Method::GET, http::Method::POST);
    assert!(p.allows(Failure::Connect, &get) && p.allows(Failure::Connect, &post));
    assert!(p.allows(Failure::Reset, &get) && !p.allows(Failure::Reset, &post));
    assert!(p.allows(Failure::Status(503), &get) && !p.allows(Failure::Status(503), &post));
    assert!(!p.allows(Failure::Status(502), &get) && !p.allows(Failure::Timeout, &get));
}

#[test]
fn the_budget_holds_retries_to_their_share_of_requests() {
    let b = Budget::new(20);
    // The floor: a quiet route may still retry a few times.
    let floor = (0..100).filter(|_| b.withdraw()).count() as u64;
    assert_eq!(floor, MIN_RETRIES_PER_WINDOW);
    for _ in 0..100 {
        b.deposit();
    }
    let more = (0..100).filter(|_| b.withdraw()).count() as u64;
    assert_eq!(floor + more, 20, "20 % of 100 requests");
}
