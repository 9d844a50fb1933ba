# KEEL_FUZZ=ON (docs/fuzzing.md): every keel library is instrumented for libFuzzer's
# coverage (-fsanitize=fuzzer-no-link) and checked by ASan + UBSan; the targets in fuzz/
# link libFuzzer's main with keel_fuzz_target(). Needs clang (Debian: clang-14 and
# libclang-rt-14-dev, which ships libclang_rt.fuzzer). The normal (g++) build never
# includes this file.
if(NOT CMAKE_CXX_COMPILER_ID STREQUAL "Clang")
  message(FATAL_ERROR "KEEL_FUZZ needs clang: configure with -DCMAKE_CXX_COMPILER=clang++ "
                      "(scripts/fuzz.sh does)")
endif()
if(KEEL_SANITIZE)
  message(FATAL_ERROR "KEEL_FUZZ already builds with ASan + UBSan; leave KEEL_SANITIZE off")
endif()
set(KEEL_FUZZ_SANITIZERS address,undefined)
add_compile_options(-fsanitize=fuzzer-no-link,${KEEL_FUZZ_SANITIZERS} -fno-omit-frame-pointer
                    -fno-sanitize-recover=all)
add_link_options(-fsanitize=${KEEL_FUZZ_SANITIZERS})

# keel_fuzz_target(NAME SOURCE DEPS ...): the libFuzzer binary NAME, built from SOURCE
# with -fsanitize=fuzzer,address,undefined and linked against DEPS.
function(keel_fuzz_target NAME SOURCE)
  add_executable(${NAME} ${SOURCE})
  target_compile_options(${NAME} PRIVATE -fsanitize=fuzzer,${KEEL_FUZZ_SANITIZERS})
  target_link_options(${NAME} PRIVATE -fsanitize=fuzzer,${KEEL_FUZZ_SANITIZERS})
  target_link_libraries(${NAME} PRIVATE ${ARGN})
  set_property(GLOBAL APPEND PROPERTY KEEL_FUZZ_TARGETS ${NAME})
endfunction()
