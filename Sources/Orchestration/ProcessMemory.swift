#if canImport(Glibc)
import Glibc
#endif

/// Giving memory back after a big, transient job.
enum ProcessMemory {
    /// Returns the heap's free pages to the kernel (glibc `malloc_trim`). A full sync builds and drops
    /// hundreds of megabytes at 10k Services (the kernel's dump, the restore text, two plans); glibc keeps
    /// freed memory in its arenas, so without this the agent's resident size stays at that peak for good,
    /// although the steady state needs far less. A few milliseconds; the agent calls it after long syncs only.
    static func returnFreedPages() {
        #if canImport(Glibc)
        if let trim = mallocTrim { _ = trim(0) }
        #endif
    }

    #if canImport(Glibc)
    /// glibc's `malloc_trim` (malloc.h is not part of Swift's Glibc module), looked up once; nil on a C
    /// library without it.
    private static let mallocTrim: (@convention(c) (Int) -> Int32)? = {
        guard let handle = dlopen(nil, RTLD_NOW), let symbol = dlsym(handle, "malloc_trim") else { return nil }
        return unsafeBitCast(symbol, to: (@convention(c) (Int) -> Int32).self)
    }()
    #endif
}
