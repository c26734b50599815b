// libFuzzer target, differential: a JSON document read by one thread and by two (the path a List of 8 MB or
// more takes, forced here on any size; the first byte picks where the second thread is sent to split) must
// give the same objects, kept items and counts, or the same error. Any difference traps.
@testable import KubeObjects

enum TwoThreadsOutcome: Equatable {
    case loaded(ClusterObjects, JSONValue, Int)
    case failed(String)
}

func readJSON(_ bytes: [UInt8], from start: Int, twoThreads: Bool, fraction: Double) -> TwoThreadsOutcome {
    var objects = ClusterObjects()
    do {
        let (document, streamed, _) = try DocumentLoader.parseJSON(
            bytes, from: start, source: "fuzz.json", into: &objects,
            twoThreadsFrom: twoThreads ? 0 : Int.max, splitFraction: fraction, awaitSplit: true)
        return .loaded(objects, document, streamed)
    } catch {
        return .failed("\(error)")
    }
}

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzTwoThreads(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    guard let data, size > 1 else { return 0 }
    let fraction = Double(data[0]) / 255
    let bytes = Array(UnsafeBufferPointer(start: data + 1, count: size - 1))
    var start = 0
    while start < bytes.count, [0x20, 0x09, 0x0A, 0x0D].contains(bytes[start]) { start += 1 }
    guard start < bytes.count, DocumentLoader.isJSON(bytes, at: start) else { return 0 }
    let one = readJSON(bytes, from: start, twoThreads: false, fraction: fraction)
    let two = readJSON(bytes, from: start, twoThreads: true, fraction: fraction)
    if one != two { fatalError("one thread and two differ:\n\(one)\n\(two)") }
    return 0
}
