//! Making a graph's tensors into views, by where they live ([`super::residence`]): tensors the
//! plugin reads directly become views of their own memory; tensors it may read only through
//! ggml's tensor API (llama.cpp's RPC backend) are copied in, and outputs there are written back.
//!
//! Weights read through the API are copied once per process into [`WeightCopies`] (the fp16
//! staging then keys on the copy like on any host weight); ggml never says when a weights buffer
//! is freed, so each use compares a sample of the remote bytes with the copy's and copies again
//! when they differ (another model loaded at the same server address). Activations are copied per
//! graph, once per tensor (members of a group share theirs, as they share src1 on the host).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::residence::Access;
use super::Operand;
use crate::ffi::ggml_tensor;
use crate::ggml::{Ggml, TypeInfo};
use crate::support::TensorDesc;

/// A host copy of a tensor's bytes, 8-byte aligned (f32 runs are read in place).
type Copy = Arc<Vec<u64>>;

fn zeroed(bytes: usize) -> Vec<u64> {
    vec![0u64; bytes.div_ceil(8)]
}

fn as_bytes(v: &[u64]) -> &[u8] {
    bytemuck::cast_slice(v)
}

/// The bytes of `t` through `ggml_backend_tensor_get`, after the checks its `GGML_ASSERT`s make
/// (which would abort the host): a buffer, data, and `n` within `ggml_nbytes`.
fn get(g: &Ggml, t: &ggml_tensor, off: usize, out: &mut [u8]) -> Result<(), String> {
    let (Some(get), Some(nbytes)) = (g.placement.tensor_get, g.placement.nbytes) else {
        return Err("ggml_backend_tensor_get not found".into());
    };
    check(t)?;
    // SAFETY: a live tensor of the graph (or model) being computed.
    let total = unsafe { nbytes(t) };
    if off.checked_add(out.len()).is_none_or(|end| end > total) {
        return Err(format!(
            "tensor read {off}+{} past its {total} bytes",
            out.len()
        ));
    }
    // SAFETY: checked as ggml_backend_tensor_get asserts; `out` is writable for its length.
    unsafe { get(t, out.as_mut_ptr().cast(), off, out.len()) };
    Ok(())
}

fn check(t: &ggml_tensor) -> Result<(), String> {
    let has_buffer = !t.buffer.is_null()
        // SAFETY: view_src is a valid tensor while its view is.
        || (!t.view_src.is_null() && unsafe { !(*t.view_src).buffer.is_null() });
    if !has_buffer || t.data.is_null() {
        return Err("tensor without buffer or data".into());
    }
    Ok(())
}

/// Bytes of `t` as ggml counts them (`ggml_nbytes`), which is what one read copies.
fn nbytes(g: &Ggml, t: &ggml_tensor) -> Result<usize, String> {
    let nbytes = g.placement.nbytes.ok_or("ggml_nbytes not found")?;
    // SAFETY: a live tensor.
    Ok(unsafe { nbytes(t) })
}

/// A sample of a weight's bytes, first and last (at most 256 each), compared on every use.
fn sample(g: &Ggml, t: &ggml_tensor, n: usize) -> Result<Vec<u8>, String> {
    let k = n.min(256);
    let mut s = vec![0u8; 2 * k];
    let (a, b) = s.split_at_mut(k);
    get(g, t, 0, a)?;
    get(g, t, n - k, b)?;
    Ok(s)
}

/// Host copies of weights read through the API, for the process (see the module doc).
#[derive(Default)]
pub struct WeightCopies {
    copies: Mutex<HashMap<(usize, TensorDesc), Copy>>,
}

impl WeightCopies {
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        let m = self.copies.lock().unwrap_or_else(|e| e.into_inner());
        m.values().map(|c| c.len() * 8).sum()
    }

    /// The copy of weight `t` (`desc`), checked against a sample of the remote bytes, copied
    /// (again) when missing or different.
    fn get(&self, g: &Ggml, t: &ggml_tensor, desc: TensorDesc) -> Result<Copy, String> {
        let n = nbytes(g, t)?;
        if n == 0 {
            return Err("empty weight".into());
        }
        let s = sample(g, t, n)?;
        let key = (t.data as usize, desc);
        let mut m = self.copies.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = m.get(&key) {
            let b = as_bytes(c);
            let k = n.min(256);
            if b.len() >= n && b[..k] == s[..k] && b[n - k..n] == s[k..] {
                return Ok(c.clone());
            }
        }
        let mut v = zeroed(n);
        get(g, t, 0, &mut bytemuck::cast_slice_mut(&mut v)[..n])?;
        let c = Arc::new(v);
        m.insert(key, c.clone());
        Ok(c)
    }
}

/// The views of one `graph_compute` call: the copies they read stay alive until it returns, and
/// outputs copied out are written back by [`Fetch::write_back`].
pub struct Fetch<'a> {
    g: &'a Ggml,
    weights: &'a WeightCopies,
    /// Activations copied in, by tensor address and description (read once per graph).
    inputs: HashMap<(usize, TensorDesc), Copy>,
    /// Weights used by this graph (held so a copy replaced meanwhile stays alive for its views).
    held: Vec<Copy>,
    /// Outputs computed into host buffers, to be written to their tensors.
    outputs: Vec<(*mut ggml_tensor, Vec<u64>, usize)>,
}

impl<'a> Fetch<'a> {
    pub fn new(g: &'a Ggml, weights: &'a WeightCopies) -> Self {
        Fetch {
            g,
            weights,
            inputs: HashMap::new(),
            held: Vec::new(),
            outputs: Vec::new(),
        }
    }

    /// A view of input `t` read as `access` says.
    ///
    /// # Safety
    /// `t` is a live, allocated tensor of the graph being computed (or a weight of a live model);
    /// for [`Access::Direct`], `t.data` is host memory of its shape (as [`Operand::of_tensor`]).
    pub unsafe fn input(
        &mut self,
        t: &ggml_tensor,
        info: &TypeInfo,
        access: Access,
        weight: bool,
    ) -> Result<Operand, String> {
        let desc = super::desc(t);
        match access {
            // SAFETY: forwarded to the caller.
            Access::Direct => Ok(unsafe { Operand::of_tensor(t, info) }),
            Access::No => Err("tensor in a buffer the device does not read".into()),
            Access::Api => {
                let c = if weight {
                    let c = self.weights.get(self.g, t, desc)?;
                    self.held.push(c.clone());
                    c
                } else if let Some(c) = self.inputs.get(&(t.data as usize, desc)) {
                    c.clone()
                } else {
                    let n = nbytes(self.g, t)?;
                    let mut v = zeroed(n);
                    get(self.g, t, 0, &mut bytemuck::cast_slice_mut(&mut v)[..n])?;
                    let c = Arc::new(v);
                    self.inputs.insert((t.data as usize, desc), c.clone());
                    c
                };
                let bytes = as_bytes(&c);
                // SAFETY: `c` is held by this Fetch (or the weight copies) until it is dropped,
                // after the views; nothing writes it.
                Ok(unsafe { Operand::of_bytes(desc, bytes, info) })
            }
        }
    }

    /// A writable view of output `t` (F32) written as `access` says: directly, or into a host
    /// buffer written back by [`Fetch::write_back`].
    ///
    /// # Safety
    /// As for [`Fetch::input`]; `t` is apart from every input of its computation.
    pub unsafe fn output(
        &mut self,
        t: *mut ggml_tensor,
        info: &TypeInfo,
        access: Access,
    ) -> Result<Operand, String> {
        // SAFETY: per the contract.
        let tr = unsafe { &*t };
        match access {
            // SAFETY: forwarded to the caller.
            Access::Direct => Ok(unsafe { Operand::of_tensor(tr, info) }),
            Access::No => Err("output in a buffer the device does not write".into()),
            Access::Api => {
                check(tr)?;
                let n = nbytes(self.g, tr)?;
                let desc = super::desc(tr);
                let mut v = zeroed(n);
                // Strided outputs keep the bytes between rows as they are.
                get(self.g, tr, 0, &mut bytemuck::cast_slice_mut(&mut v)[..n])?;
                let f: &mut [f32] = bytemuck::cast_slice_mut(&mut v);
                // SAFETY: the Vec's heap block does not move when the Vec is moved into
                // `outputs`, where it stays until written back (after every use of the view).
                let view = unsafe { Operand::of_f32_mut(desc, f) };
                self.outputs.push((t, v, n));
                Ok(view)
            }
        }
    }

    /// Writes the outputs copied out since the last call to their tensors (after the group that
    /// computed them, before anything reads them).
    pub fn write_back(&mut self) -> Result<(), String> {
        let set = self.g.placement.tensor_set;
        for (t, v, n) in self.outputs.drain(..) {
            let set = set.ok_or("ggml_backend_tensor_set not found")?;
            // SAFETY: a live tensor of the graph (the caller's contract of `output`), checked and
            // `n` = its ggml_nbytes.
            unsafe { set(t, v.as_ptr().cast(), 0, n) };
            // The tensor changed: a copy of it read as an input is stale.
            // SAFETY: as above.
            let key = unsafe { ((*t).data as usize, super::desc(&*t)) };
            // Held, not dropped: a view of the old copy may still be in use.
            if let Some(old) = self.inputs.remove(&key) {
                self.held.push(old);
            }
        }
        Ok(())
    }

    /// Whether outputs wait to be written back.
    pub fn pending(&self) -> bool {
        !self.outputs.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ffi::{ggml_backend_buffer, GGML_TYPE_F32};
    use std::cell::Cell;
    use std::ffi::{c_int, c_void};

    // A fake "remote" backend: `data` is the address of the bytes on the far side, read and written
    // only through the fake tensor_get / tensor_set, as llama.cpp's RPC client does. Calls are
    // counted per thread (tests run in parallel).
    thread_local! {
        static GETS: Cell<usize> = const { Cell::new(0) };
        static SETS: Cell<usize> = const { Cell::new(0) };
    }
    fn gets() -> usize {
        GETS.with(Cell::get)
    }
    fn sets() -> usize {
        SETS.with(Cell::get)
    }

    unsafe extern "C" fn nbytes(t: *const ggml_tensor) -> usize {
        // SAFETY: the tests pass valid tensors.
        let t = unsafe { &*t };
        4 + (0..4)
            .map(|i| (t.ne[i] as usize - 1) * t.nb[i])
            .sum::<usize>()
    }
    unsafe extern "C" fn get(t: *const ggml_tensor, out: *mut c_void, off: usize, n: usize) {
        GETS.with(|c| c.set(c.get() + 1));
        // SAFETY: the plugin checked bounds; the fake remote memory is the tensor's `data`.
        unsafe {
            assert!(
                off + n <= nbytes(t),
                "read past the tensor reached the backend"
            );
            std::ptr::copy_nonoverlapping((*t).data.cast::<u8>().add(off), out.cast(), n);
        }
    }
    unsafe extern "C" fn set(t: *mut ggml_tensor, src: *const c_void, off: usize, n: usize) {
        SETS.with(|c| c.set(c.get() + 1));
        // SAFETY: as above.
        unsafe { std::ptr::copy_nonoverlapping(src.cast(), (*t).data.cast::<u8>().add(off), n) };
    }
    unsafe extern "C" fn unused_buft() -> crate::ffi::ggml_backend_buffer_type_t {
        std::ptr::null_mut()
    }
    unsafe extern "C" fn unused_is_host(_: crate::ffi::ggml_backend_buffer_type_t) -> bool {
        false
    }
    unsafe extern "C" fn unused_traits(_: c_int) -> *const crate::ffi::ggml_type_traits {
        std::ptr::null()
    }
    unsafe extern "C" fn unused_n(_: *mut crate::ffi::ggml_cgraph) -> c_int {
        0
    }
    unsafe extern "C" fn unused_node(
        _: *mut crate::ffi::ggml_cgraph,
        _: c_int,
    ) -> *mut ggml_tensor {
        std::ptr::null_mut()
    }

    fn fake_ggml() -> Ggml {
        Ggml {
            cpu_buffer_type: unused_buft,
            buft_is_host: unused_is_host,
            get_type_traits: unused_traits,
            graph_n_nodes: unused_n,
            graph_node: unused_node,
            buffer_get_usage: None,
            buffer_get_base: None,
            buffer_get_size: None,
            placement: crate::ggml::Placement {
                tensor_get: Some(get),
                tensor_set: Some(set),
                nbytes: Some(nbytes),
                ..Default::default()
            },
        }
    }

    const F32: TypeInfo = TypeInfo {
        blck_size: 1,
        type_size: 4,
        to_float: None,
    };

    /// An F32 [n, rows] tensor whose "remote" bytes are `remote`.
    fn tensor(remote: &mut [f32], n: i64, rows: i64) -> ggml_tensor {
        // SAFETY: an all-zero ggml_tensor is a valid value of the struct (null pointers, zeros).
        let mut t: ggml_tensor = unsafe { std::mem::zeroed() };
        t.type_ = GGML_TYPE_F32;
        t.ne = [n, rows, 1, 1];
        t.nb = [
            4,
            4 * n as usize,
            4 * (n * rows) as usize,
            4 * (n * rows) as usize,
        ];
        t.data = remote.as_mut_ptr().cast();
        t.buffer = std::ptr::NonNull::<ggml_backend_buffer>::dangling().as_ptr();
        t
    }

    #[test]
    fn weights_are_copied_once_and_again_when_the_remote_bytes_change() {
        let g = fake_ggml();
        let copies = WeightCopies::default();
        let mut remote: Vec<f32> = (0..64).map(|v| v as f32).collect();
        let t = tensor(&mut remote, 8, 8);
        let mut f = Fetch::new(&g, &copies);
        // SAFETY: t is a live fake tensor.
        let v = unsafe { f.input(&t, &F32, Access::Api, true) }.unwrap();
        assert_eq!(v.get(3, 2, 0, 0), 19.0);
        assert_ne!(
            v.addr(),
            t.data as usize,
            "a host copy, never the remote address"
        );
        let before = copies.bytes();
        // SAFETY: as above.
        let again = unsafe { f.input(&t, &F32, Access::Api, true) }.unwrap();
        assert_eq!(again.addr(), v.addr(), "the same copy");
        assert_eq!(copies.bytes(), before);
        drop(f);
        // Another model at the same address: the sample differs, the weight is copied again.
        remote[0] = -1.0;
        let mut f = Fetch::new(&g, &copies);
        // SAFETY: as above.
        let fresh = unsafe { f.input(&t, &F32, Access::Api, true) }.unwrap();
        assert_eq!(fresh.get(0, 0, 0, 0), -1.0);
    }

    #[test]
    fn activations_are_read_once_per_graph_and_outputs_written_back() {
        let g = fake_ggml();
        let copies = WeightCopies::default();
        let mut remote: Vec<f32> = (0..32).map(|v| v as f32).collect();
        let t = tensor(&mut remote, 8, 4);
        let mut f = Fetch::new(&g, &copies);
        let gets_before = gets();
        // SAFETY: t is a live fake tensor.
        let a = unsafe { f.input(&t, &F32, Access::Api, false) }.unwrap();
        // SAFETY: as above.
        let b = unsafe { f.input(&t, &F32, Access::Api, false) }.unwrap();
        assert_eq!(a.addr(), b.addr(), "members of a group share one copy");
        assert_eq!(gets() - gets_before, 1);
        let mut out_remote = vec![0f32; 32];
        let mut o = tensor(&mut out_remote, 8, 4);
        // SAFETY: o is a live fake tensor apart from t.
        let view = unsafe { f.output(&mut o, &F32, Access::Api) }.unwrap();
        assert!(f.pending());
        view.put(1, 2, 0, 0, 7.5);
        assert_eq!(out_remote[17], 0.0, "nothing written before write_back");
        let sets_before = sets();
        f.write_back().unwrap();
        assert_eq!(sets() - sets_before, 1);
        assert_eq!(out_remote[17], 7.5);
        assert!(!f.pending());
    }

    #[test]
    fn unreadable_and_unallocated_tensors_never_reach_the_backend() {
        let g = fake_ggml();
        let copies = WeightCopies::default();
        let mut remote = vec![0f32; 16];
        let mut f = Fetch::new(&g, &copies);
        let t = tensor(&mut remote, 4, 4);
        // SAFETY: t is a live fake tensor.
        assert!(unsafe { f.input(&t, &F32, Access::No, false) }.is_err());
        let mut no_buffer = t;
        no_buffer.buffer = std::ptr::null_mut();
        let gets_before = gets();
        // SAFETY: as above.
        assert!(unsafe { f.input(&no_buffer, &F32, Access::Api, false) }.is_err());
        let mut no_data = t;
        no_data.data = std::ptr::null_mut();
        // SAFETY: as above.
        assert!(unsafe { f.input(&no_data, &F32, Access::Api, true) }.is_err());
        assert_eq!(
            gets(),
            gets_before,
            "refused before ggml_backend_tensor_get"
        );
        // A read past ggml_nbytes is refused by the plugin, not by ggml's assert.
        let mut out = [0u8; 8];
        assert!(super::get(&g, &t, 60, &mut out).is_err());
    }
}
