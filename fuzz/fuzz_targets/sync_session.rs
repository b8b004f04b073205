//! Fuzz target: the sync state machines driven by an arbitrary sequence of operations. The agent's
//! `Uploader` gets arbitrary welcomes, acks (old, repeated, beyond what was sent) and sends; central's
//! `plan_ingest` gets arbitrary batches (gaps, reordering, duplicates, foreign sites). Neither may
//! panic on peer input, and their invariants are checked from both sides after every step:
//! `acked <= sent`, `poll_send` stays inside the window and the batch size, an accepted plan
//! moves the high-water mark by exactly the number of new events, contiguously.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_protocol::session::{IngestError, Uploader, plan_ingest};
use outpost_protocol::{EventEnvelope, MAX_EVENTS_PER_BATCH};

fn ev(site: &str, seq: u64) -> EventEnvelope {
    EventEnvelope {
        site: site.into(),
        seq,
        event_id: format!("e{seq}"),
        at_ms: 0,
        schema: 1,
        body: vec![],
        trace_id: outpost_protocol::derived_trace_id(site, seq, "e"),
    }
}

fn small(b: u8) -> u64 {
    u64::from(b % 64)
}

fuzz_target!(|data: &[u8]| {
    let mut it = data.iter().copied();
    let window = u64::from(it.next().unwrap_or(1) % 32) + 1;
    let max_batch = u64::from(it.next().unwrap_or(1) % 32) + 1;
    let mut up = Uploader::new(window, max_batch);
    let mut last_local = 0u64;
    let mut hwm = 0u64;
    while let Some(op) = it.next() {
        let arg = it.next().unwrap_or(0);
        match op % 6 {
            // the outbox grows
            0 => last_local = last_local.saturating_add(small(arg)),
            // a (possibly hostile) welcome
            1 => {
                let central = if arg & 0x80 != 0 {
                    u64::MAX - small(arg)
                } else {
                    small(arg)
                };
                match up.handle_welcome(central, last_local) {
                    Ok(()) => {
                        assert_eq!(up.acked(), central);
                        assert_eq!(up.sent(), central);
                    }
                    Err(_) => assert!(central > last_local),
                }
            }
            // a (possibly hostile) ack
            2 => {
                let through = if arg & 0x80 != 0 {
                    u64::MAX - small(arg)
                } else {
                    small(arg)
                };
                let before = up.acked();
                match up.handle_ack(through) {
                    Ok(true) => assert_eq!(up.acked(), through),
                    Ok(false) => assert_eq!(up.acked(), before),
                    Err(_) => assert!(through > up.sent()),
                }
            }
            // send what the uploader offers
            3 => {
                if let Some(r) = up.poll_send(last_local) {
                    let (start, end) = (*r.start(), *r.end());
                    assert_eq!(start, up.sent() + 1);
                    assert!(end <= last_local);
                    assert!(end - up.sent() <= max_batch);
                    assert!(end - up.acked() <= window);
                    up.handle_sent(end);
                }
            }
            // central plans an arbitrary batch built from the next bytes
            4 => {
                let n = usize::from(arg % 8);
                let mut batch = Vec::with_capacity(n);
                for _ in 0..n {
                    let b = it.next().unwrap_or(0);
                    let site = if b == 0xff { "plant-2" } else { "plant-1" };
                    batch.push(ev(site, small(b)));
                }
                check_plan(&mut hwm, &batch);
            }
            // central plans a well-formed batch starting at an arbitrary seq
            _ => {
                let start = small(arg);
                let len = u64::from(it.next().unwrap_or(0) % 8);
                let batch: Vec<_> = (start..start + len).map(|s| ev("plant-1", s)).collect();
                check_plan(&mut hwm, &batch);
            }
        }
        assert!(up.acked() <= up.sent(), "acked never passes sent");
    }
    // A batch over the limit is refused, not applied. Built only for the empty input (which the
    // fuzzer always tries): a 1,001-event batch on every run would cost most of the exec/s.
    if data.is_empty() {
        let too_many: Vec<_> = (1..=MAX_EVENTS_PER_BATCH as u64 + 1)
            .map(|s| ev("plant-1", s))
            .collect();
        assert_eq!(
            plan_ingest("plant-1", 0, &too_many),
            Err(IngestError::TooMany(too_many.len()))
        );
    }
});

fn check_plan(hwm: &mut u64, batch: &[EventEnvelope]) {
    match plan_ingest("plant-1", *hwm, batch) {
        Ok(plan) => {
            assert!(plan.duplicates <= batch.len());
            assert!(batch[..plan.duplicates].iter().all(|e| e.seq <= *hwm));
            let fresh = &batch[plan.duplicates..];
            for (i, e) in fresh.iter().enumerate() {
                assert_eq!(e.seq, *hwm + 1 + i as u64, "new events continue the mark");
                assert_eq!(e.site, "plant-1");
            }
            assert_eq!(plan.new_hwm, *hwm + fresh.len() as u64);
            *hwm = plan.new_hwm;
        }
        Err(IngestError::ForeignSite { .. }) => {
            assert!(batch.iter().any(|e| e.site != "plant-1"));
        }
        Err(IngestError::TooMany(n)) => assert!(n > MAX_EVENTS_PER_BATCH),
        Err(IngestError::Gap { .. }) => {}
    }
}
