//! A small classic-BPF generator for seccomp filters; [`crate::seccomp`] holds the policy.
//!
//! Code is built from [`Block`]s: straight-line instructions whose jumps all land inside the
//! block and whose every path ends in a return. Blocks only ever compose by concatenation behind
//! one conditional jump, so no jump is patched after the fact and each combinator can be checked
//! on its own; [`Program::new`] then re-checks the result the way the kernel will.
//!
//! [`dispatch`] turns a table of syscall numbers into a balanced binary search, so a syscall
//! walks about log2(N) comparisons instead of a chain of N; a leaf is a return or, inlined, the
//! argument check of its syscall. That matters twice per process: the kernel's action cache
//! emulates the filter for every syscall number when it is installed, and each syscall the cache
//! cannot answer runs the filter again.

use crate::{JailError, Result};

// Opcodes from <linux/bpf_common.h>, already or-ed together (class | size | mode, or
// class | op | source). Only these are ever generated.
/// `BPF_LD | BPF_W | BPF_ABS`: A = 32-bit word of `seccomp_data` at offset k.
const LD_W_ABS: u16 = 0x20;
/// `BPF_JMP | BPF_JA`: pc += k.
const JA: u16 = 0x05;
/// `BPF_JMP | BPF_JEQ | BPF_K`.
const JEQ_K: u16 = 0x15;
/// `BPF_JMP | BPF_JGE | BPF_K`.
const JGE_K: u16 = 0x35;
/// `BPF_JMP | BPF_JSET | BPF_K`: jump if A & k != 0.
const JSET_K: u16 = 0x45;
/// `BPF_RET | BPF_K`.
const RET_K: u16 = 0x06;

/// Size of `struct seccomp_data`; the kernel rejects loads beyond it.
const SECCOMP_DATA_LEN: u32 = 64;

/// One instruction, with the layout of the kernel's `struct sock_filter`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Insn {
    code: u16,
    jt: u8,
    jf: u8,
    k: u32,
}

/// A 32-bit word of the kernel's `struct seccomp_data` (x86_64 is little-endian, so an argument's
/// low half comes first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    /// The syscall number.
    Nr,
    /// The `AUDIT_ARCH_*` value of the calling convention.
    Arch,
    /// Bits 0..32 of argument `n` (0..6).
    ArgLow(u8),
    /// Bits 32..64 of argument `n` (0..6).
    ArgHigh(u8),
}

impl Field {
    fn offset(self) -> u32 {
        match self {
            Field::Nr => 0,
            Field::Arch => 4,
            Field::ArgLow(n) => 16 + 8 * u32::from(n),
            Field::ArgHigh(n) => 20 + 8 * u32::from(n),
        }
    }
}

/// A test of the accumulator against a constant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Test {
    /// `A == k`.
    Eq(u32),
    /// `A >= k` (unsigned).
    Ge(u32),
    /// `A & k != 0`.
    AnySet(u32),
}

/// Code whose jumps stay inside it and whose every path ends in a return; see the module docs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block(Vec<Insn>);

impl Block {
    /// Returns `value` (a `SECCOMP_RET_*` action) to the kernel.
    pub fn ret(value: u32) -> Block {
        Block(vec![Insn {
            code: RET_K,
            jt: 0,
            jf: 0,
            k: value,
        }])
    }

    /// Loads `field` into the accumulator, then runs `then`.
    pub fn load(field: Field, then: Block) -> Block {
        let mut code = Vec::with_capacity(1 + then.0.len());
        code.push(Insn {
            code: LD_W_ABS,
            jt: 0,
            jf: 0,
            k: field.offset(),
        });
        code.extend(then.0);
        Block(code)
    }

    /// Runs `then` if the accumulator passes `test`, else `otherwise`.
    pub fn branch(test: Test, then: Block, otherwise: Block) -> Block {
        let (op, k) = match test {
            Test::Eq(k) => (JEQ_K, k),
            Test::Ge(k) => (JGE_K, k),
            Test::AnySet(k) => (JSET_K, k),
        };
        let jump = |jt, jf| Insn {
            code: op,
            jt,
            jf,
            k,
        };
        let mut code = Vec::with_capacity(2 + then.0.len() + otherwise.0.len());
        // Conditional offsets are 8 bits: put first whichever side is short enough to jump over.
        if let Ok(skip) = u8::try_from(otherwise.0.len()) {
            code.push(jump(skip, 0));
            code.extend(otherwise.0);
            code.extend(then.0);
        } else if let Ok(skip) = u8::try_from(then.0.len()) {
            code.push(jump(0, skip));
            code.extend(then.0);
            code.extend(otherwise.0);
        } else {
            // Both sides are long: the false side takes an unconditional jump (32-bit offset)
            // over `then`. An impossible length saturates, and `Program::new` rejects the jump.
            code.push(jump(1, 0));
            code.push(Insn {
                code: JA,
                jt: 0,
                jf: 0,
                k: u32::try_from(then.0.len()).unwrap_or(u32::MAX),
            });
            code.extend(then.0);
            code.extend(otherwise.0);
        }
        Block(code)
    }

    /// Runs `then` if the 64-bit argument `arg` has any bit of `mask` set, else `otherwise`.
    /// Each half is tested only where `mask` has bits, so a value cannot hide a flag in the half
    /// that is not looked at.
    pub fn arg_any_set(arg: u8, mask: u64, then: Block, otherwise: Block) -> Block {
        let low = mask as u32;
        let high = (mask >> 32) as u32;
        let test_high = |otherwise| {
            if high == 0 {
                otherwise
            } else {
                Block::load(
                    Field::ArgHigh(arg),
                    Block::branch(Test::AnySet(high), then.clone(), otherwise),
                )
            }
        };
        if low == 0 {
            test_high(otherwise)
        } else {
            Block::load(
                Field::ArgLow(arg),
                Block::branch(Test::AnySet(low), then.clone(), test_high(otherwise)),
            )
        }
    }

    /// Runs `then` if the accumulator equals one of `values`, else `otherwise`.
    pub fn one_of(values: &[u32], then: Block, otherwise: Block) -> Block {
        values.iter().rev().fold(otherwise, |rest, &v| {
            Block::branch(Test::Eq(v), then.clone(), rest)
        })
    }

    /// Number of instructions.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Always false: every block ends in a return. Present because `len` is.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Dispatches on the syscall number, which must be in the accumulator: a number in `table` runs
/// its block, any other runs `default`.
///
/// The number line is cut into runs of numbers with the same block (so a run of allowed calls
/// costs one leaf), and the runs are searched with a balanced tree of `A >= start` tests.
pub fn dispatch(table: &[(u32, Block)], default: &Block) -> Block {
    let mut sorted: Vec<&(u32, Block)> = table.iter().collect();
    sorted.sort_by_key(|(nr, _)| *nr);
    // Each run is (first number, block); it ends where the next one starts.
    let mut runs: Vec<(u32, &Block)> = Vec::new();
    fn push<'a>(runs: &mut Vec<(u32, &'a Block)>, start: u32, block: &'a Block) {
        // Neighbours with the same block merge into one run.
        if runs.last().is_none_or(|(_, last)| *last != block) {
            runs.push((start, block));
        }
    }
    // `next` is the first number not yet covered; None once u32::MAX is.
    let mut next = Some(0u32);
    for (nr, block) in sorted {
        let Some(start) = next else { break };
        if *nr < start {
            // A duplicate number; the caller's table is a map, so this cannot happen.
            continue;
        }
        if *nr > start {
            push(&mut runs, start, default);
        }
        push(&mut runs, *nr, block);
        next = nr.checked_add(1);
    }
    if let Some(start) = next {
        push(&mut runs, start, default);
    }
    search(&runs)
}

/// A balanced search over `runs` (non-empty, sorted, starting at the lowest number that can
/// reach this node).
fn search(runs: &[(u32, &Block)]) -> Block {
    match runs {
        // Unreachable (dispatch always covers 0); RET 0 would kill, failing closed.
        [] => Block::ret(0),
        [(_, block)] => (*block).clone(),
        _ => {
            let (low, high) = runs.split_at(runs.len() / 2);
            Block::branch(Test::Ge(high[0].0), search(high), search(low))
        }
    }
}

/// A checked filter, ready to install with [`crate::seccomp::install`].
pub struct Program(Vec<libc::sock_filter>);

impl Program {
    /// Checks `block` as the kernel's classic-BPF and seccomp checkers will (size, opcodes,
    /// aligned loads inside `seccomp_data`, jumps inside the program, a return at the end) so a
    /// bad filter fails here, where the error can be reported, rather than in a forked child.
    pub fn new(block: Block) -> Result<Program> {
        let code = block.0;
        let invalid = |what: String| Err(JailError::Seccomp(what));
        if code.is_empty() || code.len() > libc::BPF_MAXINSNS as usize {
            return invalid(format!("{} instructions", code.len()));
        }
        for (pc, insn) in code.iter().enumerate() {
            let rest = code.len() - pc - 1;
            let fits = |off: u64| off < rest as u64;
            let ok = match insn.code {
                LD_W_ABS => insn.k.is_multiple_of(4) && insn.k < SECCOMP_DATA_LEN,
                JA => fits(u64::from(insn.k)),
                JEQ_K | JGE_K | JSET_K => fits(insn.jt.into()) && fits(insn.jf.into()),
                RET_K => true,
                _ => false,
            };
            if !ok {
                return invalid(format!("bad instruction {pc}: {insn:?}"));
            }
        }
        if code.last().is_none_or(|insn| insn.code != RET_K) {
            return invalid("the last instruction is not a return".into());
        }
        Ok(Program(
            code.into_iter()
                .map(|i| libc::sock_filter {
                    code: i.code,
                    jt: i.jt,
                    jf: i.jf,
                    k: i.k,
                })
                .collect(),
        ))
    }

    /// The instructions, in the kernel's layout.
    pub fn instructions(&self) -> &[libc::sock_filter] {
        &self.0
    }

    /// Number of instructions.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Always false: [`Program::new`] refuses an empty program.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for Program {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Program({} instructions)", self.0.len())
    }
}

/// A classic-BPF interpreter for the instructions this module generates, for tests.
#[cfg(test)]
pub(crate) mod interp {
    use super::*;

    /// The kernel's `struct seccomp_data`, as far as filters see it.
    #[derive(Debug, Clone, Copy)]
    pub(crate) struct Data {
        pub nr: u32,
        pub arch: u32,
        pub args: [u64; 6],
    }

    impl Data {
        fn word(&self, offset: u32) -> u32 {
            assert!(
                offset.is_multiple_of(4) && offset < SECCOMP_DATA_LEN,
                "load {offset}"
            );
            let mut bytes = Vec::with_capacity(64);
            bytes.extend(self.nr.to_le_bytes());
            bytes.extend(self.arch.to_le_bytes());
            bytes.extend(0u64.to_le_bytes()); // instruction pointer
            for arg in self.args {
                bytes.extend(arg.to_le_bytes());
            }
            let at = offset as usize;
            u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes"))
        }
    }

    /// Runs `prog` on `data`: the value returned and how many instructions ran. Panics on
    /// anything the kernel would refuse.
    pub(crate) fn run(prog: &[libc::sock_filter], data: &Data) -> (u32, usize) {
        let mut a = 0u32;
        let mut pc = 0usize;
        let mut steps = 0;
        loop {
            let insn = prog.get(pc).expect("pc inside the program");
            steps += 1;
            let jump = |cond: bool| pc + 1 + usize::from(if cond { insn.jt } else { insn.jf });
            pc = match insn.code {
                LD_W_ABS => {
                    a = data.word(insn.k);
                    pc + 1
                }
                0x54 => {
                    // BPF_ALU | BPF_AND | BPF_K, which this module does not generate.
                    a &= insn.k;
                    pc + 1
                }
                JA => pc + 1 + insn.k as usize,
                JEQ_K => jump(a == insn.k),
                0x25 => jump(a > insn.k), // BPF_JMP | BPF_JGT | BPF_K, likewise.
                JGE_K => jump(a >= insn.k),
                JSET_K => jump(a & insn.k != 0),
                RET_K => return (insn.k, steps),
                other => panic!("opcode {other:#x} at {pc}"),
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::interp::{Data, run};
    use super::*;

    fn data(nr: u32, args: [u64; 6]) -> Data {
        Data { nr, arch: 0, args }
    }

    fn eval(block: &Block, d: Data) -> u32 {
        let prog = Program::new(block.clone()).expect("valid program");
        run(prog.instructions(), &d).0
    }

    #[test]
    fn branch_lays_out_long_sides_with_an_unconditional_jump() {
        // A side of n instructions: n-1 loads and a return of `value`.
        let long = |value, n| (1..n).fold(Block::ret(value), |b, _| Block::load(Field::Nr, b));
        for (then_len, else_len) in [(1, 1), (300, 1), (1, 300), (255, 256), (300, 300)] {
            let b = Block::load(
                Field::Nr,
                Block::branch(Test::Eq(7), long(1, then_len), long(2, else_len)),
            );
            assert_eq!(eval(&b, data(7, [0; 6])), 1, "{then_len}/{else_len}");
            assert_eq!(eval(&b, data(8, [0; 6])), 2, "{then_len}/{else_len}");
        }
    }

    #[test]
    fn dispatch_finds_every_number() {
        let table: Vec<(u32, Block)> = [0u32, 1, 2, 5, 9, 10, 100, u32::MAX]
            .iter()
            .map(|&nr| (nr, Block::ret(nr % 3)))
            .collect();
        let b = Block::load(Field::Nr, dispatch(&table, &Block::ret(99)));
        for nr in (0..120).chain([u32::MAX - 1, u32::MAX]) {
            let want = table
                .iter()
                .find(|(n, _)| *n == nr)
                .map_or(99, |(n, _)| n % 3);
            assert_eq!(eval(&b, data(nr, [0; 6])), want, "nr {nr}");
        }
        let empty = Block::load(Field::Nr, dispatch(&[], &Block::ret(5)));
        assert_eq!(eval(&empty, data(3, [0; 6])), 5);
    }

    #[test]
    fn arg_any_set_checks_both_halves() {
        let b = |mask| Block::arg_any_set(1, mask, Block::ret(1), Block::ret(0));
        let low = b(0x10);
        let high = b(0x10 << 32);
        let both = b(0x10 | 0x10 << 32);
        for (arg, l, h, bo) in [
            (0u64, 0, 0, 0),
            (0x10, 1, 0, 1),
            (0x10 << 32, 0, 1, 1),
            (!(0x10 | 0x10 << 32), 0, 0, 0),
            (u64::MAX, 1, 1, 1),
        ] {
            let d = data(0, [0, arg, 0, 0, 0, 0]);
            assert_eq!(
                (eval(&low, d), eval(&high, d), eval(&both, d)),
                (l, h, bo),
                "{arg:#x}"
            );
        }
    }

    #[test]
    fn loads_read_the_right_words() {
        let args = [1, 2 | 3 << 32, 4, 5, 6, 7 << 32];
        let d = Data {
            nr: 11,
            arch: 12,
            args,
        };
        let read = |f| {
            // Return the loaded word by comparing against each candidate.
            let b = Block::load(
                f,
                Block::one_of(&[11], Block::ret(11), {
                    (0..=12).rev().fold(Block::ret(99), |rest, v| {
                        Block::branch(Test::Eq(v), Block::ret(v), rest)
                    })
                }),
            );
            eval(&b, d)
        };
        assert_eq!(read(Field::Nr), 11);
        assert_eq!(read(Field::Arch), 12);
        assert_eq!(read(Field::ArgLow(1)), 2);
        assert_eq!(read(Field::ArgHigh(1)), 3);
        assert_eq!(read(Field::ArgLow(5)), 0);
        assert_eq!(read(Field::ArgHigh(5)), 7);
    }

    #[test]
    fn program_rejects_what_the_kernel_would() {
        let load = |k| {
            Block(vec![
                Insn {
                    code: LD_W_ABS,
                    jt: 0,
                    jf: 0,
                    k,
                },
                Block::ret(0).0[0],
            ])
        };
        assert!(Program::new(load(60)).is_ok());
        assert!(Program::new(load(64)).is_err());
        assert!(Program::new(load(2)).is_err());
        assert!(Program::new(Block(Vec::new())).is_err());
        let no_ret = Block(vec![Insn {
            code: LD_W_ABS,
            jt: 0,
            jf: 0,
            k: 0,
        }]);
        assert!(Program::new(no_ret).is_err());
        let far = Block(vec![
            Insn {
                code: JEQ_K,
                jt: 1,
                jf: 0,
                k: 0,
            },
            Block::ret(0).0[0],
        ]);
        assert!(Program::new(far).is_err());
        let huge = (0..4096).fold(Block::ret(0), |b, _| Block::load(Field::Nr, b));
        assert!(Program::new(huge).is_err());
    }
}
