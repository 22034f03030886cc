//! Reusable activation and output surfaces, and the one request size a group's surfaces share.

use super::*;

/// Reusable activation and output surfaces, in the engine's own memory (IOSurfaces on the ANE,
/// written and read in place). Surfaces of one request must all have the size of the largest
/// (often the weights), so allocating and zeroing them per dispatch would cost as much as the
/// weights; a few are kept per size.
#[derive(Debug, Default)]
pub struct ScratchPool {
    pub(super) free: HashMap<usize, Vec<Surface>>,
}

impl ScratchPool {
    pub(super) fn take(
        &mut self,
        engine: &dyn Engine,
        size: usize,
    ) -> Result<Surface, EngineError> {
        match self.free.get_mut(&size).and_then(Vec::pop) {
            Some(s) => Ok(s),
            None => engine.new_surface(size),
        }
    }

    /// An activation and an output surface of `size` bytes.
    pub(crate) fn take_pair(
        &mut self,
        engine: &dyn Engine,
        size: usize,
    ) -> Result<(Surface, Surface), EngineError> {
        let x = self.take(engine, size)?;
        match self.take(engine, size) {
            Ok(y) => Ok((x, y)),
            Err(e) => {
                self.give(x);
                Err(e)
            }
        }
    }

    /// Returns what [`ScratchPool::take_pair`] gave, so that the next `take_pair` of this size gets
    /// the same surfaces in the same roles: on the ANE a request is cached per binding, and
    /// swapping x and y each time would double the bindings.
    pub(crate) fn give_pair(&mut self, x: Surface, y: Surface) {
        self.give(y);
        self.give(x);
    }

    pub(super) fn give(&mut self, s: Surface) {
        let v = self.free.entry(s.alloc_size()).or_default();
        // Three: an int8-weight dispatch binds a scale surface beside the pair (`super::int8`).
        if v.len() < 3 {
            v.push(s);
        }
    }
}

/// The allocation size of every surface of a request for `s`. It uses the largest column bucket
/// for the activations and outputs, so all column chunks of a group (and the staged weights) share
/// one size.
pub(super) fn request_size(s: &TiledShape, max_cols: usize) -> usize {
    let wide = TiledShape {
        n: s.n.max(max_cols),
        ..*s
    };
    request_alloc_size(&[wide.x_len() * 2, s.w_len() * 2, wide.y_len() * 2])
}
