use super::*;

fn space() -> AddressSpace {
    AddressSpace::new(64 << 20).expect("address space")
}

#[test]
fn anonymous_mappings_are_placed_top_down_and_zeroed() {
    let mut mm = space();
    let a = mm
        .map(
            Placement::Hint(0),
            8192,
            Prot::READ_WRITE,
            VmaKind::Anonymous,
            None,
        )
        .expect("map");
    let b = mm
        .map(
            Placement::Hint(0),
            4096,
            Prot::READ_WRITE,
            VmaKind::Anonymous,
            None,
        )
        .expect("map");
    assert_eq!(a, layout::MMAP_TOP - 8192);
    assert_eq!(b, a - 4096);
    let mut buf = [0xffu8; 16];
    mm.read(a, &mut buf).expect("read");
    assert_eq!(buf, [0; 16]);
}

#[test]
fn writes_respect_protection_and_bounds() {
    let mut mm = space();
    let a = mm
        .map(
            Placement::Hint(0),
            4096,
            Prot::READ,
            VmaKind::Anonymous,
            None,
        )
        .expect("map");
    assert_eq!(mm.write(a, b"x"), Err(Errno::EFAULT));
    mm.protect(a, 4096, Prot::READ_WRITE).expect("mprotect");
    mm.write(a, b"hello").expect("write");
    let mut buf = [0u8; 5];
    mm.read(a, &mut buf).expect("read");
    assert_eq!(&buf, b"hello");
    // Straddling the end of the mapping faults, and so do kernel-half and null pointers.
    assert_eq!(mm.write(a + 4094, b"abcd"), Err(Errno::EFAULT));
    assert_eq!(mm.read(0, &mut buf), Err(Errno::EFAULT));
    assert_eq!(mm.read(0xffff_8000_0000_0000, &mut buf), Err(Errno::EFAULT));
    assert_eq!(mm.read(u64::MAX - 2, &mut buf), Err(Errno::EFAULT));
    assert_eq!(
        mm.read(layout::SUPERVISOR_BASE, &mut buf),
        Err(Errno::EFAULT)
    );
}

#[test]
fn unmap_splits_and_frees_frames() {
    let mut mm = space();
    let a = mm
        .map(
            Placement::Hint(0),
            3 * 4096,
            Prot::READ_WRITE,
            VmaKind::Anonymous,
            None,
        )
        .expect("map");
    let before = mm.ram().frames_in_use();
    assert_eq!(mm.resident_pages(a, a + 3 * 4096), 3);
    mm.unmap(a + 4096, 4096).expect("munmap");
    assert!(mm.vma_at(a).is_some());
    assert!(mm.vma_at(a + 4096).is_none());
    assert!(mm.vma_at(a + 8192).is_some());
    mm.unmap(a, 3 * 4096).expect("munmap");
    assert_eq!(mm.resident_pages(a, a + 3 * 4096), 0);
    assert_eq!(
        mm.ram().frames_in_use(),
        before - 3,
        "all data frames returned"
    );
    assert_eq!(mm.unmap(a + 1, 4096), Err(Errno::EINVAL));
}

#[test]
fn mprotect_of_a_hole_is_enomem() {
    let mut mm = space();
    let a = mm
        .map(
            Placement::Hint(0),
            4096,
            Prot::READ_WRITE,
            VmaKind::Anonymous,
            None,
        )
        .expect("map");
    assert_eq!(mm.protect(a, 8192, Prot::READ), Err(Errno::ENOMEM));
    assert_eq!(
        mm.vma_at(a).map(|v| v.prot),
        Some(Prot::READ_WRITE),
        "nothing changed"
    );
}

#[test]
fn fixed_noreplace_and_absurd_lengths() {
    let mut mm = space();
    let a = mm
        .map(
            Placement::Hint(0),
            4096,
            Prot::READ,
            VmaKind::Anonymous,
            None,
        )
        .expect("map");
    assert_eq!(
        mm.map(
            Placement::FixedNoReplace(a),
            4096,
            Prot::READ,
            VmaKind::Anonymous,
            None
        ),
        Err(Errno::EEXIST)
    );
    assert_eq!(
        mm.map(
            Placement::Hint(0),
            1 << 62,
            Prot::READ,
            VmaKind::Anonymous,
            None
        ),
        Err(Errno::ENOMEM)
    );
    assert_eq!(
        mm.map(
            Placement::Hint(0),
            u64::MAX,
            Prot::READ,
            VmaKind::Anonymous,
            None
        ),
        Err(Errno::ENOMEM)
    );
    assert_eq!(
        mm.map(
            Placement::Fixed(0x1000),
            4096,
            Prot::READ,
            VmaKind::Anonymous,
            None
        ),
        Err(Errno::EPERM)
    );
}

#[test]
fn large_mappings_fault_in_on_demand() {
    let mut mm = space();
    let len = 4 << 20;
    let a = mm
        .map(
            Placement::Hint(0),
            len,
            Prot::READ_WRITE,
            VmaKind::Anonymous,
            None,
        )
        .expect("map");
    assert_eq!(mm.resident_pages(a, a + len), 0);
    assert_eq!(
        mm.handle_fault(a + len / 2, PageFaultCode(2)),
        FaultOutcome::Resolved
    );
    assert_eq!(mm.resident_pages(a, a + len), FAULT_AROUND_PAGES);
    assert_eq!(
        mm.handle_fault(a + len + 4096 * 64, PageFaultCode(2)),
        FaultOutcome::NotMapped
    );
    mm.protect(a, 4096, Prot::READ).expect("mprotect");
    assert_eq!(
        mm.handle_fault(a, PageFaultCode(2)),
        FaultOutcome::AccessDenied
    );
}

#[test]
fn brk_grows_shrinks_and_refuses_absurd_requests() {
    let mut mm = space();
    mm.init_brk(0x60_0000);
    assert_eq!(mm.brk(0), 0x60_0000);
    assert_eq!(mm.brk(0x60_0000 + 10_000), 0x60_0000 + 10_000);
    mm.write(0x60_0000 + 9_000, b"heap")
        .expect("heap is writable");
    assert_eq!(mm.brk(1 << 46), 0x60_0000 + 10_000, "unchanged");
    assert_eq!(mm.brk(0x60_0000), 0x60_0000);
    assert_eq!(mm.write(0x60_0000 + 9_000, b"x"), Err(Errno::EFAULT));
}

#[test]
fn mremap_moves_frames_without_copying() {
    let mut mm = space();
    let a = mm
        .map(
            Placement::Hint(0),
            4096,
            Prot::READ_WRITE,
            VmaKind::Anonymous,
            None,
        )
        .expect("map");
    // Block in-place growth.
    mm.map(
        Placement::Fixed(a + 4096),
        4096,
        Prot::READ,
        VmaKind::Anonymous,
        None,
    )
    .expect("map");
    mm.write(a, b"keep").expect("write");
    let b = mm.remap(a, 4096, 3 * 4096, true, None).expect("mremap");
    assert_ne!(a, b);
    let mut buf = [0u8; 4];
    mm.read(b, &mut buf).expect("read");
    assert_eq!(&buf, b"keep");
    assert!(mm.vma_at(a).is_none());
    assert_eq!(
        mm.remap(b, 4096, 8 * 4096, false, None).map(|_| ()),
        mm.remap(b, 4096, 8 * 4096, false, None).map(|_| ())
    );
}

#[test]
fn cstrings_stop_at_nul_and_bound_length() {
    let mut mm = space();
    let a = mm
        .map(
            Placement::Hint(0),
            4096,
            Prot::READ_WRITE,
            VmaKind::Anonymous,
            None,
        )
        .expect("map");
    mm.write(a, b"/etc/passwd\0").expect("write");
    assert_eq!(mm.read_cstring(a, 4096).expect("path"), b"/etc/passwd");
    assert_eq!(mm.read_cstring(a, 4), Err(Errno::ENAMETOOLONG));
    // No NUL before the end of the mapping.
    mm.write(a, &[b'a'; 4096]).expect("fill");
    assert_eq!(mm.read_cstring(a, 8192), Err(Errno::EFAULT));
}

#[test]
fn iovecs_cover_the_accessible_prefix() {
    let mut mm = space();
    let a = mm
        .map(
            Placement::Hint(0),
            2 * 4096,
            Prot::READ_WRITE,
            VmaKind::Anonymous,
            None,
        )
        .expect("map");
    let iovs = mm.host_iovecs(a + 100, 1 << 40, true).expect("iovecs");
    let total: usize = iovs.iter().map(|v| v.iov_len).sum();
    assert_eq!(total, 2 * 4096 - 100);
    assert_eq!(
        mm.host_iovecs(0, 10, true).map(|v| v.len()),
        Err(Errno::EFAULT)
    );
}

#[test]
fn guest_iovec_arrays_are_checked() {
    let mut mm = space();
    let a = mm
        .map(
            Placement::Hint(0),
            2 * 4096,
            Prot::READ_WRITE,
            VmaKind::Anonymous,
            None,
        )
        .expect("map");
    let mut arr = Vec::new();
    for (base, len) in [(a + 4096, 10u64), (0, 0), (a + 4096 + 100, 20)] {
        arr.extend_from_slice(&base.to_le_bytes());
        arr.extend_from_slice(&len.to_le_bytes());
    }
    mm.write(a, &arr).expect("write");
    let iovs = mm.guest_iovecs(a, 3, true).expect("iovecs");
    assert_eq!(iovs.iter().map(|v| v.iov_len).sum::<usize>(), 30);
    assert_eq!(
        mm.guest_iovecs(a, -1, true).map(|v| v.len()),
        Err(Errno::EINVAL)
    );
    assert_eq!(
        mm.guest_iovecs(a, 2000, true).map(|v| v.len()),
        Err(Errno::EINVAL)
    );
    assert_eq!(
        mm.guest_iovecs(0, 1, true).map(|v| v.len()),
        Err(Errno::EFAULT)
    );
    // A NULL buffer with a length is EFAULT.
    mm.write(a, &[0u8; 8]).expect("write");
    assert_eq!(
        mm.guest_iovecs(a, 1, false).map(|v| v.len()),
        Err(Errno::EFAULT)
    );
}

#[test]
fn guarded_pages_fault_for_their_kind_of_access_and_keep_the_guard_across_changes() {
    let mut mm = space();
    let a = mm
        .map(
            Placement::Hint(0),
            2 * 4096,
            Prot::READ_WRITE,
            VmaKind::Anonymous,
            None,
        )
        .expect("map");
    let write_present = PageFaultCode(2 | 1);
    let read_present = PageFaultCode(1);
    mm.set_guard(a, Some(Guard::Write));
    let entry = |mm: &AddressSpace, va| mm.pt.lookup(&mm.ram, va).expect("mapped").flags;
    assert!(
        !entry(&mm, a).write,
        "a write guard makes the entry read-only"
    );
    assert!(entry(&mm, a + 4096).write, "the next page is not guarded");
    assert_eq!(mm.handle_fault(a + 8, write_present), FaultOutcome::Guarded);
    // An mprotect that keeps writes allowed keeps the guard.
    mm.protect(a, 2 * 4096, Prot::READ_WRITE).expect("mprotect");
    assert!(!entry(&mm, a).write);
    mm.lift_guard(a);
    assert!(entry(&mm, a).write, "lifted for one instruction");
    mm.apply_guard(a);
    assert!(!entry(&mm, a).write);
    mm.set_guard(a, Some(Guard::Access));
    assert!(
        !entry(&mm, a).user,
        "an access guard makes the entry supervisor-only"
    );
    assert_eq!(mm.handle_fault(a, read_present), FaultOutcome::Guarded);
    mm.set_guard(a, None);
    let e = entry(&mm, a);
    assert!(e.user && e.write, "unguarded: the mapping's rights again");
    // A page the guest did not touch yet is guarded once it is populated.
    let b = mm
        .map(
            Placement::Hint(0),
            4096,
            Prot::READ_WRITE,
            VmaKind::Anonymous,
            None,
        )
        .expect("map");
    mm.discard(b, 4096).expect("discard");
    mm.set_guard(b, Some(Guard::Write));
    if mm.pt.lookup(&mm.ram, b).is_none() {
        assert_eq!(mm.handle_fault(b, PageFaultCode(2)), FaultOutcome::Resolved);
    }
    assert!(!entry(&mm, b).write);
    assert_eq!(mm.handle_fault(b, write_present), FaultOutcome::Guarded);
}
